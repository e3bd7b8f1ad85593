"""Bad input through the CLI entry point, in-process: exit 2, one ``switchkd: error:`` line naming the
key, no traceback, nothing written.  Hand-listed cases (the issue's) plus generated ones."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from switchkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
KD = str(ROOT / "configs/tiny/kd.yaml")
SWITCH = str(ROOT / "configs/tiny/switch.yaml")

LISTED = [  # (override, the key the message must name)
    ("train.lr=inf", "train.lr"), ("train.lr=-1", "train.lr"), ("train.lr=nan", "train.lr"),
    ("train.max_steps=-5", "train.max_steps"), ("train.max_steps=0", "train.max_steps"),
    ("train.warmup_steps=-1", "train.warmup_steps"), ("train.weight_decay=-1", "train.weight_decay"),
    ("train.clip=nan", "train.clip"), ("train.save_every=-1", "train.save_every"),
    ("train.eval_every=-1", "train.eval_every"), ("train.log_every=-1", "train.log_every"),
    ("train.loss_chunk=-1", "train.loss_chunk"), ("train.seed=-1", "train.seed"), ("data.limit=0", "data.limit"),
    ("eval.limit=0", "eval.limit"), ("eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("eval.batch_size=0", "eval.batch_size"), ("eval.buckets={a: 1}", "eval.buckets"),
    ("model.name=tiny:gpt2,layers=0", "model.name"), ("model.name=tiny:gpt2,heads=3", "model.name"),
    ("model.name=tiny:gpt2,dim=-4", "model.name"), ("model.name=tiny:gpt2,positions=8", "model.name"),
    ("data.fields.foo=bar", "data.fields.foo"), ("data.fields={instruction: 5}", "data.fields.instruction"),
    ("data.template='{foo}'", "data.template"), ("method.priming='Hint: {foo}'", "method.priming"),
    ("train.loggers=[foo]", "train.loggers"), ("method.temperature=nan", "method.temperature"),
    ("method.temperature=0", "method.temperature"), ("method.temperature=-1", "method.temperature"),
    ("method.max_new_tokens=0", "method.max_new_tokens"), ("method.max_new_tokens=-1", "method.max_new_tokens"),
    ("method.switch.tau0=nan", "method.switch.tau0"), ("method.switch.tau0=-inf", "method.switch.tau0"), ("method.switch.decay=-1", "method.switch.decay"),
    ("method.decoding.temperature=0", "method.decoding.temperature"), ("method.decoding.temperature=-1", "method.decoding.temperature"),
    ("method.decoding.top_p=0", "method.decoding.top_p"), ("method.decoding.top_p=1.5", "method.decoding.top_p"), ("method.decoding.top_k=-1", "method.decoding.top_k"),
    ("method.distillm.replay_size=0", "method.distillm.replay_size"), ("method.distillm.student_prob_step=-1", "method.distillm.student_prob_step"),
    ("method.params.k=0", "method.params.k"), ("train.lr=[1", "train.lr"), ("method.switch.draft_k=0", "method.switch.draft_k"),
]
PRESET_SPECIFIC = [  # (preset, override, key)
    (ROOT / "configs/tiny/distillm.yaml", "method.params.alpha=5", "method.params.alpha"),
    (ROOT / "configs/tiny/distillm.yaml", "method.params.alpha=-1", "method.params.alpha"),
    (ROOT / "configs/tiny/bild.yaml", "method.params.k=2", "method.params.k"),
    (ROOT / "configs/tiny/gkd.yaml", "method.params.beta=2", "method.params.beta"),
]


def _run(capsys, tmp_path, argv):
    out = tmp_path / "run"
    rc = main(argv + [f"output.dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err, out


def _assert_one_line(rc, err, out, key):
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("switchkd: error:"), err
    assert "Traceback" not in err[0] and key in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("override,key", LISTED)
def test_listed_bad_overrides(override, key, capsys, tmp_path):
    _assert_one_line(*_run(capsys, tmp_path, ["train", KD, override]), key)


@pytest.mark.parametrize("preset,override,key", PRESET_SPECIFIC)
def test_bad_divergence_parameters(preset, override, key, capsys, tmp_path):
    _assert_one_line(*_run(capsys, tmp_path, ["train", str(preset), override]), key)


NUMERIC = {  # key -> generator of invalid values
    "train.lr": ["0", "-1e-3", "inf", "-inf", "nan"], "train.batch_size": ["0", "-3"], "train.grad_accum": ["0"],
    "train.epochs": ["0", "-1"], "train.clip": ["-0.5", "inf"], "train.weight_decay": ["-0.1", "nan"],
    "method.kd_ratio": ["-0.1", "1.5", "nan"], "method.mixture.student_ratio": ["2", "-1"], "method.switch.ratio": ["1.01"],
    "method.distillm.replay_ratio": ["-0.5"], "method.distillm.init_student_prob": ["3"], "method.distillm.max_student_prob": ["-2"],
    "method.distillm.loss_eps": ["-0.1", "nan"], "method.decoding.top_p": ["-1", "0", "2"], "method.switch.max_draft_k": ["0"],
    "data.max_prompt_length": ["0", "-5"], "data.max_length": ["0", "1"], "data.synthetic_size": ["0"],
    "eval.temperature": ["0", "-1"], "eval.top_p": ["0"], "eval.top_k": ["-2"], "eval.max_length": ["0"],
    "model.lora.r": ["-1"], "model.lora.alpha": ["0"], "model.lora.dropout": ["1", "-0.1"],
}


def _generated(n: int = 200, seed: int = 0):
    """Random bad overrides: an invalid value for one key, sometimes with valid noise around it."""
    rng = random.Random(seed)
    valid_noise = ["train.log_every=5", "method.decoding.top_k=3", "data.synthetic_size=16", "train.lr=1e-4"]
    cases = []
    for _ in range(n):
        key = rng.choice(sorted(NUMERIC))
        bad = f"{key}={rng.choice(NUMERIC[key])}"
        noise = [x for x in rng.sample(valid_noise, rng.randint(0, 2)) if not x.startswith(key + "=")]
        cases.append((rng.choice([KD, SWITCH]), noise + [bad], key))
    return cases


@pytest.mark.slow
def test_generated_bad_configs(capsys, tmp_path):
    for preset, overrides, key in _generated():
        rc, err, out = _run(capsys, tmp_path, ["train", preset, *overrides])
        _assert_one_line(rc, err, out, key)


def test_usage_errors_version_and_print_config(capsys, tmp_path):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip().startswith("switchkd 0.")
    for argv in (["train"], ["bogus"], ["eval", "--model"], ["debias", "--model", "m"], ["calibrate", KD]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("switchkd: error:"), (argv, err)
    out = tmp_path / "x"
    assert main(["train", KD, f"output.dir={out}", "train.lr=3e-4", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "lr: 0.0003" in text and f"dir: {out}" in text and not out.exists()


BAD_FILES = {  # name -> (bytes, what the message must say)
    "list.json": (b'[1, 2, 3]', "item 1"),
    "empty.parquet": (b"", "parquet"),
    "corrupt.parquet": (b"PAR1 not really", "parquet"),
    "latin1.jsonl": ('{"instruction": "caf\u00e9", "output": "x"}\n'.encode("latin-1"), "UTF-8"),
    "gz.jsonl": (b"\x1f\x8b\x08\x00rest", "gzip"),
    "msg_str.jsonl": (b'{"messages": "hello"}\n', "messages"),
    "msg_strs.jsonl": (b'{"messages": ["a", "b"]}\n', "messages"),
    "chat_no_template.jsonl": (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
                               "chat template"),
    "deep.jsonl": (b"[" * 100000 + b"]" * 100000 + b"\n", ":1"),
    "number.jsonl": (b'{"instruction": 5, "output": "x"}\n', "must be strings"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_data_files_are_one_line_errors(name, capsys, tmp_path):
    data, fragment = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    extra = ["data.template=none"] if name == "number.jsonl" else []
    rc, err, out = _run(capsys, tmp_path, ["train", KD, f"data.train={path}", "data.dev=null", *extra])
    _assert_one_line(rc, err, out, str(path))
    assert fragment in err[0], err


@pytest.mark.parametrize("argv,fragment", [
    (["eval", "--model", "m", "--data", "synthetic:test", "--batch-size", "0"], "--batch-size"),
    (["eval", "--model", "m", "--data", "synthetic:test", "--limit", "0"], "--limit"),
    (["eval", "--model", "m", "--data", "synthetic:test", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "--model", "tiny:gpt2", "--data", "synthetic:test", "--template", "{foo}"], "{foo}"),
    (["generate", KD, "--output", "x.jsonl", "--batch-size", "0"], "--batch-size"),
    (["cache-teacher", KD, "--output", "c", "--k", "-1"], "--k"),
    (["cache-teacher", KD, "--output", "c", "--k", "0"], "--k"),
    (["eval", "--model", "./no/such/dir", "--data", "synthetic:test"], "no such local directory"),
])
def test_bad_command_flags(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("switchkd: error:") and fragment in err[0], err
    assert not any(tmp_path.iterdir())


def test_corrupt_model_files_are_one_line_errors(capsys, tmp_path):
    from switchkd.config import ModelConfig
    from switchkd.models import load_model, load_tokenizer

    tok = load_tokenizer(ModelConfig(name="tiny:gpt2"))
    d = tmp_path / "m"
    load_model(ModelConfig(name="tiny:gpt2,layers=1,dim=32,heads=2"), tok).save_pretrained(d)
    tok.save_pretrained(d)
    weights = d / "model.safetensors"
    good = weights.read_bytes()
    capsys.readouterr()  # the save's progress bar
    for bad in (b"garbage", good[: len(good) // 2], good[:8]):
        weights.write_bytes(bad)
        for argv in (["eval", "--model", str(d), "--data", "synthetic:test", "--output", str(tmp_path / "ev")],
                     ["train", KD, f"teacher.name={d}"]):
            rc, err, out = _run(capsys, tmp_path, argv) if argv[0] == "train" else (main(argv), capsys.readouterr().err.strip().splitlines(), tmp_path / "ev")
            _assert_one_line(rc, err, out, str(d))


def test_more_listed_cases(capsys, tmp_path):
    for override, key in (("data.train=synthetic:bogus", "synthetic:bogus"), ("train.batch_size=1000000000000", "train.batch_size"),
                          ("output.dir=/proc/switchkd-test", "output.dir")):
        rc = main(["train", KD, "data.synthetic_size=16", "data.dev=null", override] +
                  ([] if override.startswith("output.dir") else [f"output.dir={tmp_path / 'r'}"]))
        err = [x for x in capsys.readouterr().err.strip().splitlines() if "error" in x or "Traceback" in x]
        assert rc == 2 and len(err) == 1 and err[0].startswith("switchkd: error:") and key in err[0], (override, err)
        assert not (tmp_path / "r").exists()


def test_config_mistakes_are_reported_before_torch_loads():
    import subprocess
    import sys

    code = ("import sys; from switchkd.cli import main; "
            f"rc = main(['train', {KD!r}, 'train.lr=-1', 'output.dir=/nonexistent/x']); "
            "print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["2", "False"], (r.stdout, r.stderr)


def test_input_files_are_checked_before_the_models_load(monkeypatch, capsys, tmp_path):
    """LM text and a teacher cache are read (and their mistakes reported) before any model loads."""
    def boom(*a, **k):
        raise AssertionError("models loaded before the inputs were checked")

    monkeypatch.setattr("switchkd.train.load_pair", boom)
    bad = tmp_path / "lm.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache/teacher_topk.safetensors").write_bytes(b"x")
    for override, fragment in ((f"method.lm_data={bad}", "lm.txt"), (f"method.teacher_cache={tmp_path / 'cache'}",
                                                                       "meta.json")):
        rc = main(["train", KD, override, "data.dev=null", f"output.dir={tmp_path / 'o'}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and fragment in err[0], err

"""ROUGE-L scoring, the eval command on real MiniLLM data, and one-line errors from the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from switchkd.cli import main
from switchkd.config import ConfigError, EvalConfig, ModelConfig
from switchkd.evaluate import bucket_name, generate_texts, rouge_l
from switchkd.models import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_rouge_l_known_values():
    assert rouge_l("the cat sat", ["the cat sat"]) == pytest.approx(100.0)
    # LCS 2 ("the", "sat"), P = 2/3, R = 2/4 -> F = 2PR/(P+R) = 4/7
    assert rouge_l("the dog sat", ["the cat really sat", "zzz"]) == pytest.approx(100 * 4 / 7)
    assert rouge_l("running", ["runs"]) == pytest.approx(100.0)  # Porter stemming
    assert rouge_l("", ["something"]) == 0.0


def test_buckets():
    assert [bucket_name(n, [5, 10]) for n in (0, 5, 6, 10, 11)] == ["0-5", "0-5", "6-10", "6-10", ">10"]


def test_batched_greedy_generation_equals_one_by_one():
    tok = load_tokenizer(ModelConfig(name="tiny:llama"))
    model = load_model(ModelConfig(name="tiny:llama,layers=2,dim=32,heads=4"), tok, trainable=False)
    prompts = ["Q: a\nA: ", "Q: a much longer prompt here\nA: ", "Q: mid size\nA: "]
    cfg = EvalConfig(do_sample=False, max_new_tokens=12, batch_size=3)
    batched = generate_texts(model, tok, prompts, cfg, None)
    single = [generate_texts(model, tok, [p], cfg, None)[0] for p in prompts]
    assert batched == single
    # the engine's greedy decoding is Hugging Face generate's
    from switchkd.data import encode_prompt, left_pad
    ids, mask = left_pad([encode_prompt(tok, p) for p in prompts], tok.pad_token_id)
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert batched == [tok.decode(r[ids.shape[1]:], skip_special_tokens=True).strip() for r in hf]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    tok = load_tokenizer(ModelConfig(name="tiny:gpt2"))
    load_model(ModelConfig(name="tiny:gpt2,layers=1,dim=32,heads=2"), tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_eval_file_writes_scores_and_predictions(tiny_model_dir, shared, tmp_path):
    data = shared / "data/minillm_data/dolly/valid.jsonl"
    rc = main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--limit", "3", "--seeds", "1", "2",
               "--max-new-tokens", "6", "--output", str(tmp_path)])
    assert rc == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    r = scores["results"]["dolly"]
    assert r["n"] == 3 and len(r["rougeL_per_seed"]) == 2 and 0 <= r["rougeL"] <= 100
    preds = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and {p["seed"] for p in preds} == {1, 2}
    assert all(p["rougeL"] == pytest.approx(rouge_l(p["prediction"], p["references"])) for p in preds)


def test_sampled_eval_is_reproducible(tiny_model_dir, shared, tmp_path):
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(shared / "data/minillm_data/vicuna/valid.jsonl"),
            "--limit", "2", "--seeds", "7", "--max-new-tokens", "8"]
    main(args + ["--output", str(tmp_path / "a")])
    main(args + ["--output", str(tmp_path / "b")])
    assert (tmp_path / "a/predictions.jsonl").read_text() == (tmp_path / "b/predictions.jsonl").read_text()


def test_suite_mode_scores_all_five_sets(tiny_model_dir, shared, tmp_path, capsys):
    rc = main(["eval", "--model", str(tiny_model_dir), "--data", str(shared / "data/minillm_data"), "--limit", "2",
               "--greedy", "--max-new-tokens", "4", "--output", str(tmp_path)])
    assert rc == 0
    results = json.loads((tmp_path / "scores.json").read_text())["results"]
    assert set(results) == {"dolly", "self-inst", "vicuna", "sinst", "uinst"}
    assert "| sinst | 2 |" in capsys.readouterr().out


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "switchkd", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.slow
def test_malformed_data_is_one_line_error_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{not json}\n')
    out = tmp_path / "out"
    r = _cli("train", str(ROOT / "configs/tiny/sft.yaml"), f"data.train={bad}", f"output.dir={out}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"switchkd: error: {bad}:2: invalid JSON line (Expecting property name enclosed in double quotes)"]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("args,fragment", [
    (["train", "configs/tiny/kd.yaml", "train.lrr=3"], "unknown key 'train.lrr'"),
    (["train", "configs/nope.yaml"], "config file not found"),
    (["eval", "--model", "/nonexistent/model", "--data", "x.jsonl"], "no such local directory"),
])
def test_cli_errors_are_one_line(args, fragment):
    r = _cli(*args, cwd=ROOT)
    assert r.returncode == 2 and fragment in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_eval_missing_data_file(tiny_model_dir, tmp_path):
    r = _cli("eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "none.jsonl"))
    assert r.returncode == 2 and "no such file or directory" in r.stderr


@pytest.mark.slow
def test_demo_quick_runs(tmp_path, monkeypatch):
    """The demo's whole path at a tiny budget, in two worker processes: shipped teacher (checksum),
    layer-dropped student, the default methods, the report with the gap lines and plots."""
    monkeypatch.setenv("SWITCHKD_CACHE", str(tmp_path / "cache"))
    from switchkd.demo import run_demo

    results = run_demo(str(tmp_path / "demo"), quick=True, workers=2)
    assert list(results) == ["teacher", "init", "sft", "kd", "gkd", "switch"]
    assert results["teacher"]["rougeL"] > 30 > results["init"]["rougeL"]  # the shipped teacher is trained
    report = (tmp_path / "demo/report.md").read_text()
    assert "| switch | 1 |" in report and "| teacher | 1 |" in report and "of the gap" in report
    assert "beyond twice the sampling noise" in report
    assert (tmp_path / "demo/rouge_by_length.png").is_file() and (tmp_path / "demo/teacher_share.png").is_file()
    assert "switch during training" in report and (tmp_path / "demo/logs/switch.log").is_file()


def test_demo_refuses_a_changed_teacher_and_unknown_methods(tmp_path, monkeypatch, capsys):
    import switchkd.demo as demo

    bad = tmp_path / "teacher"
    shutil.copytree(demo.SHIPPED, bad)
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    monkeypatch.setattr(demo, "SHIPPED", bad)
    with pytest.raises(ConfigError, match="checksum"):
        demo.shipped_teacher()
    assert main(["demo", "--methods", "sft,nope", "--output", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "unknown demo method 'nope'" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "d").exists()


@pytest.mark.parametrize("spec", ["tiny:gpt2,layers=3,dim=32,heads=2", "tiny:llama,layers=3,dim=32,heads=4,seed=7"])
def test_drop_layers_keeps_the_chosen_blocks(tmp_path, spec):
    import torch
    from transformers import AutoModelForCausalLM

    from switchkd.config import ModelConfig
    from switchkd.models import drop_layers, load_model, load_tokenizer

    tok = load_tokenizer(ModelConfig(name=spec))
    big = load_model(ModelConfig(name=spec), tok, trainable=False)
    big.save_pretrained(tmp_path / "big")
    tok.save_pretrained(tmp_path / "big")
    small = AutoModelForCausalLM.from_pretrained(drop_layers(str(tmp_path / "big"), (0, 2), tmp_path / "small"))
    assert small.config.num_hidden_layers == 2
    a, b = big.state_dict(), small.state_dict()
    for k, v in b.items():
        src = k.replace(".1.", ".2.") if (".h.1." in k or ".layers.1." in k) else k
        assert torch.equal(v, a[src]), k
    with pytest.raises(ValueError, match="outside 0..2"):
        drop_layers(str(tmp_path / "big"), (0, 3), tmp_path / "bad")


def test_demo_gap_lines_say_which_differences_exceed_the_noise():
    from switchkd.demo import gap_lines

    res = {"teacher": {"rougeL": 50.0, "rougeL_std": 1.0}, "init": {"rougeL": 10.0, "rougeL_std": 0.5},
           "sft": {"rougeL": 34.0, "rougeL_std": 1.5}, "kd": {"rougeL": 31.5, "rougeL_std": 0.2},
           "gkd": {"rougeL": 30.0, "rougeL_std": 0.2}}
    lines = gap_lines(res)
    assert "sft: 34.0 ± 1.5 — closes 60% of the gap" in lines
    assert lines[-1] == ("beyond twice the sampling noise (3.0): sft > gkd (+4.0); sft > init (+24.0); "
                         "kd > init (+21.5); gkd > init (+20.0); 2 other pair(s) within it")


def test_overrides_after_flags_and_one_line_refusals(tmp_path, capsys):
    """Overrides are accepted after a flag; calibrate refuses a non-SWITCH config; eval refuses duplicate or
    negative seeds; a seed numpy cannot take is a config error; each in one line with exit 2."""
    from switchkd.cli import main

    file = tmp_path / "scores.txt"
    file.write_text("keep")
    dict_json = tmp_path / "d.json"
    dict_json.write_text('{\n  "instruction": "Say hi.",\n  "output": "hi"\n}\n')
    assert main(["train", "tiny/kd", "--print-config", "train.lr=0.123", "train.seed=7"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.123" in out and "seed: 7" in out
    assert main(["train", "tiny/kd", "--print-config", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    cases = [(["calibrate", "tiny/kd", "--target", "0.5", "train.seed=2"], "has no tau0"),
             (["eval", "--model", "tiny:gpt2", "--data", "synthetic:test", "--seeds", "10", "10",
               "--output", str(tmp_path / "e")], "distinct integers >= 0"),
             (["eval", "--model", "tiny:gpt2", "--data", "synthetic:test", "--seeds", "-1",
               "--output", str(tmp_path / "e")], "distinct integers >= 0"),
             (["train", "tiny/kd", f"output.dir={tmp_path / 'r'}", "train.seed=4294967296"], "train.seed"),
             (["eval", "--model", "tiny:gpt2", "--data", "synthetic:test", "extra.key=1"], "unrecognized arguments"),
             (["train", "tiny/kd", "output.dir=/proc/switchkd-run"], "cannot write there"),
             (["eval", "--model", "tiny:gpt2", "--data", "synthetic:test", "--max-length", "5",
               "--output", str(tmp_path / "e")], "must be larger than --max-prompt-length"),
             (["eval", "--model", "tiny:gpt2", "--data", "synthetic:test", "--max-length", "100000",
               "--max-prompt-length", "64", "--output", str(tmp_path / "e")], "larger than the model's 1024 positions"),
             (["eval", "--model", "tiny:gpt2", "--data", "synthetic:test", "--output", str(file)], "is not a directory"),
             (["eval", "--model", "tiny:gpt2", "--data", str(dict_json), "--output", str(tmp_path / "e")],
              "holds one JSON object"),
             (["train", "tiny/kd", f"data.train={tmp_path}", f"output.dir={tmp_path / 'r'}"], "is a directory"),
             (["train", "tiny/kdd"], "switchkd presets lists them"),
             (["train", "tiny/kd", "model.lora.target_modules=[q_proj]"], "model.lora.r is 0"),
             (["train", "tiny/kd", "model.lora.r=8", "model.lora.target_modules=[]"], "adapts nothing"),
             (["train", "tiny/kd", "model.lora.r=100000"], "much smaller"),
             (["train", "tiny/kd", "method.lm_weight=0.5"], "without method.lm_data")]
    for argv, msg in cases:
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and msg in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "e").exists() and not (tmp_path / "r").exists() and file.read_text() == "keep"


def test_out_of_memory_is_one_line_with_remedies_and_the_rerun_is_not_blocked(tmp_path, capsys, monkeypatch):
    from switchkd import train as train_mod
    from switchkd.cli import main

    def boom(self, *a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99999999999 bytes")

    monkeypatch.setattr(train_mod.Trainer, "fit", boom)
    out = tmp_path / "run"
    args = ["train", "tiny/kd", f"output.dir={out}", "data.synthetic_size=16", "train.max_steps=1"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("switchkd: error: out of memory") and "train.grad_accum" in err[0]
    assert (out / "config.yaml").is_file() and not (out / "metrics.jsonl").exists()
    monkeypatch.undo()
    assert main(args) == 0  # the config.yaml of a run that never stepped does not block the rerun
    assert (out / "final").is_dir()

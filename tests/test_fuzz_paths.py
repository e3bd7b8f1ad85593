"""Generated bad files and output paths through the CLI: every file a command reads gets truncated, garbage,
empty, wrong-type and wrong-encoding variants (and a folder or nothing in its place); every path a command
writes gets an existing file, a folder with other content, an unwritable place and the command's own input.
Each ends in exit 2, one ``switchkd: error:`` line naming the path, no traceback, and nothing written or
changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import pytest

from switchkd.cli import main

pytestmark = pytest.mark.slow  # ~150 CLI calls: make test runs them, make test-fast skips them

ROOT = Path(__file__).resolve().parents[1]
KD = str(ROOT / "configs/tiny/kd.yaml")
SWITCH = str(ROOT / "configs/tiny/switch.yaml")
TINY = "tiny:gpt2,layers=1,dim=32,heads=2"
SMALL = ["data.dev=null", "train.max_steps=2", "train.batch_size=2", f"model.name={TINY}"]


def _records(n: int = 12) -> str:
    return "".join(json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "", "prompt": f"Add {i}+{i + 1}: ",
                               "output": str(2 * i + 1)}) + "\n"
                   for i in range(n))


def _bbq(n: int = 8) -> str:
    rows = [{"context": f"Two people, {i}.", "question": "Who is good at math?", "ans0": "The first", "ans1": "The second",
             "ans2": "Unknown", "label": 2 if i % 2 else 0, "context_condition": "ambig" if i % 2 else "disambig",
             "category": "Age"} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared):
    """Valid inputs every command can read: a saved tiny model, instruction data, BBQ data, LM text, a
    teacher cache, a LoRA adapter, a GGUF file and a llama2.c checkpoint."""
    import shutil

    from realish import write_gguf

    from switchkd.config import ModelConfig
    from switchkd.models import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("world")
    tok = load_tokenizer(ModelConfig(name=TINY))
    model = load_model(ModelConfig(name=TINY), tok)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "data.jsonl").write_text(_records())
    (root / "bbq.jsonl").write_text(_bbq())
    (root / "lm.txt").write_text("Some pre-training text.\n\nAnother document here.\n")
    assert main(["cache-teacher", KD, f"data.train={root / 'data.jsonl'}", "data.dev=null", f"teacher.name={root / 'model'}",
                 f"model.name={root / 'model'}", "--output", str(root / "cache"), "--k", "4"]) == 0
    from peft import LoraConfig, get_peft_model

    get_peft_model(load_model(ModelConfig(name=TINY), tok), LoraConfig(r=2, target_modules=["c_attn"])) \
        .save_pretrained(root / "adapter")
    write_gguf(shared, root / "model.gguf")
    for name in ("stories260K.bin", "tok512.bin"):
        shutil.copy(shared / "models/stories260K" / name, root / name)
    return root


def _snapshot(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*")) if "__pycache__" not in p.parts}


def _expect_one_line(capsys, argv: List[str], fragment: "str | tuple", root: Path) -> None:
    before = _snapshot(root)
    rc = main(argv)
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert rc == 2, (argv, err)
    assert len(err) == 1 and err[0].startswith("switchkd: error:") and "Traceback" not in err[0], (argv, err)
    assert any(f in err[0] for f in ((fragment,) if isinstance(fragment, str) else fragment)), (argv, fragment, err)
    assert _snapshot(root) == before, argv  # nothing written, nothing changed


# ---- files a command reads ----------------------------------------------------------------------------
def _variants(good: bytes, json_like: bool) -> Dict[str, bytes]:
    out = {"truncated": good[: max(1, len(good) // 3)], "garbage": b"\x00\x9f\x92\x96 not this format \xff",
           "empty": b"", "non_utf8": b"\xff\xfe" + good[:40]}
    if json_like:
        out |= {"wrong_type_number": b"42\n", "wrong_type_list": b"[1, 2, 3]\n"}
    return out


# (name, the file inside the world to corrupt, argv given the world, json-like?, fragment the error names)
READS: List[tuple] = [
    ("train data.train", "data.jsonl", lambda w: ["train", KD, f"data.train={w / 'data.jsonl'}", *SMALL,
                                                   f"output.dir={w / 'out'}"], True),
    ("train method.lm_data", "lm.txt", lambda w: ["train", KD, f"method.lm_data={w / 'lm.txt'}", *SMALL,
                                                  f"output.dir={w / 'out'}"], False),
    ("train teacher weights", "model/model.safetensors", lambda w: ["train", KD, f"teacher.name={w / 'model'}", *SMALL,
                                                                    f"output.dir={w / 'out'}"], False),
    ("train teacher config", "model/config.json", lambda w: ["train", KD, f"teacher.name={w / 'model'}", *SMALL,
                                                             f"output.dir={w / 'out'}"], True),
    ("train cache weights", "cache/teacher_topk.safetensors",
     lambda w: ["train", KD, f"data.train={w / 'data.jsonl'}", f"method.teacher_cache={w / 'cache'}",
                f"model.name={w / 'model'}", *SMALL[:3], f"output.dir={w / 'out'}"], False),
    ("train cache meta", "cache/meta.json",
     lambda w: ["train", KD, f"data.train={w / 'data.jsonl'}", f"method.teacher_cache={w / 'cache'}",
                f"model.name={w / 'model'}", *SMALL[:3], f"output.dir={w / 'out'}"], True),
    ("train adapter config", "adapter/adapter_config.json",
     lambda w: ["train", KD, f"model.adapter={w / 'adapter'}", *SMALL, f"output.dir={w / 'out'}"], True),
    ("train adapter weights", "adapter/adapter_model.safetensors",
     lambda w: ["train", KD, f"model.adapter={w / 'adapter'}", *SMALL, f"output.dir={w / 'out'}"], False),
    ("eval --data", "data.jsonl", lambda w: ["eval", "--model", str(w / "model"), "--data", str(w / "data.jsonl"),
                                             "--limit", "2", "--greedy", "--output", str(w / "out")], True),
    ("eval --model", "model/model.safetensors", lambda w: ["eval", "--model", str(w / "model"), "--data",
                                                           "synthetic:test", "--output", str(w / "out")], False),
    ("generate data.train", "data.jsonl", lambda w: ["generate", KD, f"data.train={w / 'data.jsonl'}", "data.dev=null",
                                                     f"teacher.name={TINY}", "--output", str(w / "out.jsonl")], True),
    ("cache-teacher data.train", "data.jsonl", lambda w: ["cache-teacher", KD, f"data.train={w / 'data.jsonl'}",
                                                          "data.dev=null", f"teacher.name={TINY}", "--output",
                                                          str(w / "out")], True),
    ("calibrate data.dev", "data.jsonl", lambda w: ["calibrate", SWITCH, f"data.dev={w / 'data.jsonl'}",
                                                    f"model.name={TINY}", "--target", "0.5"], True),
    ("debias --data", "bbq.jsonl", lambda w: ["debias", "--model", str(w / "model"), "--data", str(w / "bbq.jsonl"),
                                              "--output", str(w / "out")], True),
    ("debias --model", "model/model.safetensors", lambda w: ["debias", "--model", str(w / "model"), "--data",
                                                             str(w / "bbq.jsonl"), "--output", str(w / "out")], False),
    ("shrink teacher", "model/model.safetensors", lambda w: ["shrink", str(w / "model"), str(w / "out"), "--layers",
                                                             "1", "--even"], False),
    ("prune --data", "data.jsonl", lambda w: ["prune", str(w / "model"), str(w / "out"), "--layers", "1", "--data",
                                              str(w / "data.jsonl")], True),
    ("prune teacher", "model/model.safetensors", lambda w: ["prune", str(w / "model"), str(w / "out"), "--layers", "1",
                                                            "--data", str(w / "data.jsonl")], False),
    ("train config file", "config.yaml", lambda w: ["train", str(w / "config.yaml")], False),
    ("convert gguf", "model.gguf", lambda w: ["convert", "gguf", str(w / "model.gguf"), str(w / "out")], False),
    ("convert llama2c model", "stories260K.bin", lambda w: ["convert", "llama2c", str(w / "stories260K.bin"),
                                                            str(w / "tok512.bin"), str(w / "out")], False),
    ("convert llama2c tokenizer", "tok512.bin", lambda w: ["convert", "llama2c", str(w / "stories260K.bin"),
                                                           str(w / "tok512.bin"), str(w / "out")], False),
]
def _read_cases():
    for name, rel, argv, json_like in READS:
        for variant in [*_variants(b"x" * 64, json_like), "directory", "missing"]:
            if rel.endswith((".safetensors", ".gguf", ".bin")) and variant in ("non_utf8",):
                continue  # binary files have no encoding
            yield pytest.param(name, rel, argv, json_like, variant, id=f"{name}-{variant}")


@pytest.mark.parametrize("name,rel,argv,json_like,variant", list(_read_cases()))
def test_bad_input_files(world, name, rel, argv, json_like, variant, capsys):
    path = world / rel
    if name == "train config file":
        path.write_text(Path(KD).read_text())
    good = path.read_bytes()
    try:
        if variant == "directory":
            path.unlink()
            path.mkdir()
        elif variant == "missing":
            path.unlink()
        else:
            path.write_bytes(_variants(good, json_like)[variant])
        # the error names the file, or the model/adapter/cache folder holding it
        _expect_one_line(capsys, argv(world), (str(path), str(path.parent)), world)
    finally:
        if path.is_dir() and not path.is_symlink() and variant == "directory":
            path.rmdir()
        path.write_bytes(good)


def test_cache_built_for_other_data_is_refused_before_anything_is_written(world, capsys):
    other = world / "other.jsonl"
    other.write_text(_records(6))
    try:
        _expect_one_line(capsys, ["train", KD, f"data.train={other}", f"method.teacher_cache={world / 'cache'}",
                                  f"model.name={world / 'model'}", *SMALL[:3], f"output.dir={world / 'out'}"],
                         "built for data", world)
    finally:
        other.unlink()


# ---- paths a command writes ---------------------------------------------------------------------------
# (command, argv given the output path and the world, input the output may not be, whether the output is a file)
WRITES: List[tuple] = [
    ("train", lambda o, w: ["train", KD, f"data.train={w / 'data.jsonl'}", *SMALL, f"output.dir={o}"],
     lambda w: w / "data.jsonl", False),
    ("eval", lambda o, w: ["eval", "--model", str(w / "model"), "--data", str(w / "data.jsonl"), "--limit", "2",
                           "--greedy", "--output", str(o)], lambda w: w / "model", False),
    ("generate", lambda o, w: ["generate", KD, f"data.train={w / 'data.jsonl'}", "data.dev=null", f"teacher.name={TINY}",
                               "--output", str(o)], lambda w: w / "data.jsonl", True),
    ("cache-teacher", lambda o, w: ["cache-teacher", KD, f"data.train={w / 'data.jsonl'}", "data.dev=null",
                                    f"teacher.name={TINY}", "--output", str(o)], lambda w: w / "data.jsonl", False),
    ("debias", lambda o, w: ["debias", "--model", str(w / "model"), "--data", str(w / "bbq.jsonl"), "--output", str(o)],
     lambda w: w / "model", False),
    ("shrink", lambda o, w: ["shrink", str(w / "model"), str(o), "--layers", "1", "--even"], lambda w: w / "model", False),
    ("prune", lambda o, w: ["prune", str(w / "model"), str(o), "--layers", "1", "--data", str(w / "data.jsonl")],
     lambda w: w / "model", False),
    ("convert gguf", lambda o, w: ["convert", "gguf", str(w / "model.gguf"), str(o)], lambda w: w / "model.gguf", False),
    ("demo", lambda o, w: ["demo", "--quick", "--methods", "sft", "--output", str(o)], None, False),
    ("convert llama2c", lambda o, w: ["convert", "llama2c", str(w / "stories260K.bin"), str(w / "tok512.bin"), str(o)],
     lambda w: w / "stories260K.bin", False),
]


def _write_cases():
    for name, argv, same, is_file in WRITES:
        variants = ["existing_dir_with_content", "unwritable"] + (["same_as_input"] if same else []) + \
            ([] if is_file else ["existing_file"])
        for v in variants:
            if name == "train" and v == "existing_dir_with_content":
                v = "existing_run"
            yield pytest.param(name, argv, same, v, id=f"{name}-{v}")


@pytest.mark.parametrize("name,argv,same,variant", list(_write_cases()))
def test_bad_output_paths(world, name, argv, same, variant, capsys):
    target = world / "target"
    if variant == "existing_file":
        target.write_text("keep me\n")
    elif variant == "existing_dir_with_content":
        target.mkdir()
        (target / "precious.txt").write_text("keep me\n")
    elif variant == "existing_run":
        target.mkdir()
        (target / "metrics.jsonl").write_text('{"step": 1}\n')
    elif variant == "unwritable":
        target = Path("/proc/switchkd-fuzz/out")
    elif variant == "same_as_input":
        target = same(world)
    try:
        fragment = "output.dir" if name == "train" else "OUT_DIR" if name in ("shrink", "prune", "convert gguf",
                                                                                 "convert llama2c") else "--output"
        _expect_one_line(capsys, argv(target, world), fragment, world)
    finally:
        import shutil

        if target.parent == world and target.name == "target":
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)


@pytest.mark.parametrize("change,fragment", [({"ans0": 5}, "ans0 must be a string"), ({"label": True}, "label must be"),
                                             ({"context": None}, "context must be a string"),
                                             ({"label": 1.0}, "label must be")])
def test_bbq_records_of_the_wrong_type(world, change, fragment, capsys, tmp_path):
    rows = [json.loads(x) for x in _bbq().splitlines()]
    rows[3] |= change
    bad = tmp_path / "bbq.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _expect_one_line(capsys, ["debias", "--model", str(world / "model"), "--data", str(bad), "--output",
                              str(tmp_path / "out")], (f"{bad}:4: {fragment}",), tmp_path)


@pytest.mark.parametrize("argv", [["debias", "--model", "{w}/model", "--data", "{w}/bbq.jsonl", "--output", "."],
                                  ["cache-teacher", KD, "data.train={w}/data.jsonl", "data.dev=null",
                                   f"teacher.name={TINY}", "--output", "."],
                                  ["eval", "--model", "{w}/model", "--data", "synthetic:test", "--output", "."]])
def test_the_current_directory_is_not_an_output(world, argv, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep me\n")
    _expect_one_line(capsys, [a.replace("{w}", str(world)) for a in argv], "--output .", tmp_path)

"""Presets load; unknown keys, wrong types and bad choices give one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchkd.config import ConfigError, load_config

PRESETS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml") if p.parent.name != "accelerate" and not p.name.startswith("_"))


def test_there_are_presets():
    names = {f"{p.parent.name}/{p.stem}" for p in PRESETS}
    for want in ("tiny/sft", "tiny/kd", "tiny/bild", "gpt2-xl_to_gpt2/sft", "gpt2-xl_to_gpt2/kd", "gpt2-xl_to_gpt2/bild"):
        assert want in names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.method.name
    if cfg.method.name != "sft":
        assert cfg.teacher is not None


def test_paper_scale_hyperparameters():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/gpt2-xl_to_gpt2/kd.yaml")
    t = cfg.train
    assert (t.lr, t.batch_size, t.epochs, t.scheduler, t.weight_decay, t.clip) == (5e-4, 8, 20, "cosine", 0.01, 1.0)
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (512, 256)
    assert cfg.model.name == "gpt2" and cfg.teacher.name == "gpt2-xl"


def test_overrides_apply():
    cfg = load_config(None, ["train.lr=1e-4", "method.params.beta=0.3", "method.divergence=jsd", "eval.seeds=[1,2]",
                             "teacher.name=tiny:gpt2"])
    assert cfg.train.lr == 1e-4 and cfg.method.params == {"beta": 0.3} and cfg.eval.seeds == [1, 2]


@pytest.mark.parametrize("override,fragment", [
    ("train.lrr=1", "unknown key 'train.lrr'"),
    ("nosection.x=1", "unknown key 'nosection'"),
    ("train.batch_size=abc", "train.batch_size"),
    ("method.divergence=l2", "method.divergence='l2'"),
    ("train.scheduler=step", "valid choices: cosine, linear, constant"),
    ("method.params.gamma=1", "method.params.gamma is not a parameter"),
    ("train", "expected dotted.key=value"),
])
def test_bad_overrides_are_one_line_errors(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_file_names_file_and_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'train.learning_rate'; valid keys here: lr, "):
        load_config(p)


def test_kd_without_teacher_is_rejected():
    with pytest.raises(ConfigError, match="method.divergence=fkl .kd_ratio 1.0. needs a teacher"):
        load_config(None, ["method.divergence=fkl"])
    with pytest.raises(ConfigError, match="method.source=switch needs a teacher"):
        load_config(None, ["method.source=switch"])


def test_method_name_is_a_label_only():
    """The name never changes behaviour: the loss comes from divergence and kd_ratio alone."""
    from switchkd.losses import kd_weight

    teacher = ["teacher.name=tiny:gpt2"]
    labelled = load_config(None, teacher + ["method.name=sft", "method.kd_ratio=1", "method.divergence=fkl"])
    assert kd_weight(labelled.method) == 1.0
    assert load_config(None, teacher + ["method.name=my-experiment", "method.divergence=fkl"]).method.name == "my-experiment"
    assert kd_weight(load_config(None, ["method.name=kd"]).method) == 0.0  # no divergence given: CE (SFT)
    for preset in ("sft", "seqkd"):
        assert kd_weight(load_config(Path(__file__).resolve().parents[1] / f"configs/tiny/{preset}.yaml").method) == 0.0
    for preset in ("kd", "gkd", "distillm", "switch", "bild", "imitkd"):
        assert kd_weight(load_config(Path(__file__).resolve().parents[1] / f"configs/tiny/{preset}.yaml").method) > 0


def test_bad_yaml_is_reported(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(p)


def test_per_source_sections_and_earlier_flat_keys(tmp_path, capsys):
    """SWITCH, GKD and DistiLLM settings live in method.switch/mixture/distillm, range-checked there; a
    key given outside its section is refused with the section that has it."""
    t = ["teacher.name=tiny:gpt2"]
    cfg = load_config(None, t + ["method.source=switch", "method.switch.tau0=0.3", "method.mixture.student_ratio=0.2",
                                 "method.distillm.loss_eps=0.5"])
    assert (cfg.method.switch.tau0, cfg.method.mixture.student_ratio, cfg.method.distillm.loss_eps) == (0.3, 0.2, 0.5)
    for bad, key in (("method.switch.tau0=-1", "method.switch.tau0"), ("method.switch.ratio=2", "method.switch.ratio"),
                     ("method.mixture.student_ratio=1.5", "method.mixture.student_ratio"),
                     ("method.distillm.replay_schedule=sometimes", "method.distillm.replay_schedule")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, t + [bad])
    with pytest.raises(ConfigError, match=r"unknown key 'method.tau0' \(did you mean method.switch.tau0\?\)"):
        load_config(None, t + ["method.tau0=0.25"])
    p = tmp_path / "old.yaml"
    p.write_text("teacher: {name: 'tiny:gpt2'}\nmethod: {source: distillm, replay_size: 8}\ndata: {dev: 'synthetic:dev'}\n")
    with pytest.raises(ConfigError, match=r"old.yaml: unknown key 'method.replay_size' \(did you mean "
                                          r"method.distillm.replay_size\?\)"):
        load_config(p)


def test_a_config_file_may_extend_a_base_file(tmp_path):
    """``base:`` names a file (relative to the one naming it) whose keys come first; chains work, cycles
    and missing bases are one-line errors; every shipped preset of a family shares its _base.yaml."""
    (tmp_path / "_base.yaml").write_text("model: {name: 'tiny:gpt2'}\ntrain: {lr: 0.01, batch_size: 4}\n")
    (tmp_path / "mid.yaml").write_text("base: _base.yaml\ntrain: {batch_size: 2}\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\ntrain: {epochs: 3}\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == (0.01, 2, 3)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="no cycles"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml not found"):
        load_config(tmp_path / "c.yaml")
    root = Path(__file__).resolve().parents[1] / "configs"
    for family in ("tiny", "smollm2", "gpt2-xl_to_gpt2"):
        presets = [p for p in (root / family).glob("*.yaml") if not p.name.startswith("_")]
        assert presets and all(p.read_text().count("base: _base.yaml") == 1 for p in presets), family

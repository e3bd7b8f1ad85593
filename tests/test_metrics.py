"""Final-answer accuracy for reasoning tasks: hand-written predictions and GSM8K's own references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from switchkd.metrics import accuracy, final_answer, normalize_number


@pytest.mark.parametrize("text,want", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"), ("#### 1,234", "1234"), ("so $18.00 in all\n#### $18", "18"),
    ("The answer is 42.", "42"), ("first 3, then 5, so the answer is -12", "-12"), ("no digits here", None),
    ("#### 2.50", "2.5"), ("x = 10\n#### 10\nextra 99", "10"), ("#### ", None),
])
def test_final_answer(text, want):
    assert final_answer(text) == want


def test_accuracy_on_hand_written_predictions():
    ref = ["Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72"]
    assert accuracy("48 + 24 = 72 clips.\n#### 72", ref) == 100.0
    assert accuracy("She sold 72 clips altogether.", ref) == 100.0  # the last-number rule
    assert accuracy("#### 71", ref) == 0.0 and accuracy("I don't know", ref) == 0.0
    assert accuracy("#### 72", ["#### 70", "#### 72"]) == 100.0  # any reference
    assert normalize_number("1,000") == normalize_number("1000.0") == "1000"


def test_every_gsm8k_reference_has_a_numeric_final_answer(shared):
    rows = [json.loads(x) for x in (shared / "data/gsm8k/test.jsonl").read_text().splitlines()]
    assert len(rows) == 1319
    answers = [final_answer(r["answer"]) for r in rows]
    assert all(a is not None for a in answers)
    assert all(accuracy(r["answer"], [r["answer"]]) == 100.0 for r in rows)
    # the reference's reasoning without its answer line scores by its last number, usually the answer
    body_hits = sum(accuracy(r["answer"].rsplit("####", 1)[0], [r["answer"]]) == 100.0 for r in rows)
    assert body_hits / len(rows) > 0.9
    # shifting the answer by one is always wrong
    assert all(accuracy(f"#### {float(a) + 1}", [r["answer"]]) == 0.0 for a, r in zip(answers, rows))


def test_eval_cli_accuracy_on_gsm8k(shared, tmp_path, capsys):
    from switchkd.cli import main
    from switchkd.config import ModelConfig
    from switchkd.models import load_model, load_tokenizer

    tok = load_tokenizer(ModelConfig(name="tiny:gpt2"))
    d = tmp_path / "m"
    load_model(ModelConfig(name="tiny:gpt2,layers=1,dim=32,heads=2"), tok).save_pretrained(d)
    tok.save_pretrained(d)
    rc = main(["eval", "--model", str(d), "--data", str(shared / "data/gsm8k/test.jsonl"), "--limit", "3", "--greedy",
               "--max-new-tokens", "4", "--metric", "accuracy", "--field", "instruction=question",
               "--field", "output=answer", "--output", str(tmp_path / "ev")])
    assert rc == 0
    scores = json.loads((tmp_path / "ev/scores.json").read_text())["results"]["test"]
    assert scores["metric"] == "accuracy" and scores["accuracy"] == 0.0 and scores["n"] == 3  # a random model
    assert any(line.startswith("| dataset | n | accuracy |") for line in capsys.readouterr().out.splitlines())


def test_gsm8k_priming_preset_runs_at_tiny_scale(shared, tmp_path):
    """The GPU preset configs/gsm8k/seqkd_ground_truth.yaml, with tiny models over the real GSM8K files:
    ground-truth-primed teacher rationales, a LoRA student, merged, then accuracy on test rows."""
    from switchkd.cli import main

    preset = Path(__file__).resolve().parents[1] / "configs/gsm8k/seqkd_ground_truth.yaml"
    out = tmp_path / "run"
    rc = main(["train", str(preset), "model.name=tiny:llama,layers=1,dim=32,heads=4", "model.dtype=float32",
               "teacher.name=tiny:llama,layers=1,dim=32,heads=4,seed=3", "teacher.dtype=float32", "model.lora.r=4",
               f"data.train={shared / 'data/gsm8k/train.jsonl'}", "data.limit=8", "data.template=alpaca",
               "data.max_prompt_length=400", "data.max_length=480", "method.max_new_tokens=8", "train.max_steps=2",
               "train.batch_size=4", "train.warmup_steps=0", "train.mixed_precision=no", f"output.dir={out}"])
    assert rc == 0 and (out / "final/adapter/adapter_config.json").is_file()
    rc = main(["eval", "--model", str(out / "final"), "--data", str(shared / "data/gsm8k/test.jsonl"), "--limit", "2",
               "--greedy", "--max-new-tokens", "4", "--metric", "accuracy", "--field", "instruction=question",
               "--field", "output=answer", "--output", str(tmp_path / "ev")])
    assert rc == 0
    assert json.loads((tmp_path / "ev/scores.json").read_text())["results"]["test"]["n"] == 2

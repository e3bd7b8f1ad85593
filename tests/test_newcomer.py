"""The real-model path as a newcomer meets it, through the CLI: dev evaluation sized by a key and printed, reading
models' answers, the model's own chat template in eval, settings that are honoured or refused, errors that name
the fix, parameter counts, model cards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from switchkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
needs_tokenizer = pytest.mark.skipif(not (SHARED / "data" / "gpt2_tokenizer").is_dir(), reason="../shared is missing")
FAST = ["data.synthetic_size=32", "data.max_prompt_length=48", "data.max_length=96", "train.batch_size=4",
        "train.log_every=1", "eval.max_prompt_length=48", "eval.max_length=96", "eval.max_new_tokens=8"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chat_model(path: Path, seed: int) -> Path:
    """A tiny Llama whose tokenizer has a (ChatML) chat template."""
    from transformers import AutoTokenizer

    from tests.vllm_models import build

    build(path, layers=1, seed=seed)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    return path


def _records(path: Path, n: int = 6) -> Path:
    rows = [{"instruction": f"Name a colour number {i}.", "input": "Context." if i % 2 else "", "output": "Blue."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- 1. dev evaluation sized by train.dev_rouge, printed when computed --------------------------------------------------

def test_dev_evaluation_scores_dev_rouge_prompts_and_prints_its_figures(tmp_path, capsys, monkeypatch):
    import switchkd.train as train_module

    scored = []
    real = train_module.generate_texts
    monkeypatch.setattr(train_module, "generate_texts",
                        lambda model, tok, prompts, *a, **k: scored.append(len(prompts)) or real(model, tok, prompts, *a, **k))
    out = tmp_path / "run"
    assert main(["train", "tiny/sft", *FAST, "train.max_steps=4", "train.eval_every=2", "train.dev_rouge=3",
                 "eval.limit=10", f"output.dir={out}"]) == 0
    printed = capsys.readouterr()
    assert scored == [3, 3]  # two evaluations of 3 prompts each, not the whole dev set
    lines = [line for line in (printed.out + printed.err).splitlines() if " dev (" in line]
    assert len(lines) == 2 and lines[-1].startswith("step 4/4 dev (10 examples): loss ") and "ROUGE-L" in lines[-1]
    assert "(3 prompts)" in lines[-1] and "final/ is the best dev checkpoint: step" in printed.out + printed.err
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "dev_rougeL" in r] == [2, 4]


def test_dev_rouge_zero_keeps_the_lowest_dev_loss(tmp_path, capsys, monkeypatch):
    import switchkd.train as train_module

    monkeypatch.setattr(train_module, "generate_texts", lambda *a, **k: pytest.fail("no generation expected"))
    out = tmp_path / "run"
    assert main(["train", "tiny/sft", *FAST, "train.max_steps=4", "train.eval_every=1", "train.dev_rouge=0",
                 "eval.limit=6", "train.lr=3e-3", f"output.dir={out}"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "dev_loss" in x]
    best = min(records, key=lambda r: r["dev_loss"])
    printed = capsys.readouterr()
    assert f"final/ is the best dev checkpoint: step {best['step']} (dev loss {best['dev_loss']:.4f})" in printed.out + printed.err
    assert not any("dev_rougeL" in r for r in records)


# -- 4. reading answers -------------------------------------------------------------------------------------------------

@needs_tokenizer
def test_answers_prints_and_writes_each_models_greedy_answer_through_its_chat_template(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = _chat_model(tmp_path / "a", 1), _chat_model(tmp_path / "b", 2)
    data = _records(tmp_path / "data.jsonl", 3)
    out = tmp_path / "answers.jsonl"
    assert main(["answers", "--model", str(a), "--model", str(b), "--data", str(data), "--limit", "2",
                 "--max-new-tokens", "6", "--output", str(out)]) == 0
    shown = capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and set(rows[0]["answers"]) == {"a", "b"} and rows[1]["context"] == "Context."
    tok = AutoTokenizer.from_pretrained(a)
    for name, path in (("a", a), ("b", b)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for row, i in zip(rows, range(2)):
            user = f"Name a colour number {i}." + ("\n\nContext." if i % 2 else "")
            prompt = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
            assert row["answers"][name] == tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True).strip()
            assert f"--- {name}\n{row['answers'][name]}" in shown
    assert "=== 1. Name a colour number 0." in shown and "--- reference\nBlue." in shown
    assert main(["answers", "--model", str(a), "--data", str(data), "--output", str(out)]) == 2  # no overwrite
    assert "exists" in capsys.readouterr().err


# -- 5. eval reads prompts through the model's chat template ------------------------------------------------------------

@needs_tokenizer
def test_eval_uses_the_models_chat_template_and_says_so(tmp_path, capsys):
    model = _chat_model(tmp_path / "chat", 1)
    data = _records(tmp_path / "data.jsonl", 2)
    assert main(["eval", "--model", str(model), "--data", str(data), "--greedy", "--max-new-tokens", "4",
                 "--max-length", "96", "--max-prompt-length", "48", "--output", str(tmp_path / "ev")]) == 0
    assert "eval: prompts through the model's chat template (--template auto)" in capsys.readouterr().out
    prediction = json.loads((tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()[0])
    assert prediction["prompt"].startswith("<|im_start|>user\nName a colour number 0.")
    assert main(["eval", "--model", str(model), "--data", str(data), "--greedy", "--max-new-tokens", "4",
                 "--max-length", "96", "--max-prompt-length", "48", "--template", "alpaca",
                 "--output", str(tmp_path / "ev2")]) == 0
    assert "the 'alpaca' template" in capsys.readouterr().out


# -- 6. settings honoured or refused -------------------------------------------------------------------------------------

def test_a_constant_schedule_warms_up_when_asked(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "tiny/sft", *FAST, "train.max_steps=6", "train.scheduler=constant", "train.warmup_steps=4",
                 "train.lr=1e-3", "data.dev=null", f"output.dir={out}"]) == 0
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_a_logger_that_is_not_installed_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main(["train", "tiny/sft", "train.loggers=[tensorboard]", f"output.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'tensorboard', which is not installed" in err[0] and "switchkd[logging]" in err[0]
    assert not (tmp_path / "run").exists()


# -- 3, 8. errors that name the fix --------------------------------------------------------------------------------------

def test_the_smollm2_presets_read_a_local_teacher_and_a_hub_id_offline_says_what_to_set(tmp_path, capsys):
    assert main(["train", "smollm2/kd", "--print-config"]) == 0
    assert "name: runs/smollm2/teacher" in capsys.readouterr().out
    assert main(["train", "tiny/kd", "teacher.name=HuggingFaceTB/SmolLM2-135M-Instruct", "data.synthetic_size=16",
                 f"output.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HuggingFaceTB/SmolLM2-135M-Instruct" in err[0] and "teacher.name=DIR" in err[0]
    assert "switchkd convert gguf" in err[0]


def test_a_gguf_file_as_the_model_names_the_conversion(tmp_path, capsys):
    gguf = tmp_path / "SmolLM2.Q4_1.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert main(["train", "tiny/sft", f"model.name={gguf}", f"output.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a GGUF file: convert it with switchkd convert gguf" in err[0]
    assert main(["eval", "--model", str(gguf), "--data", "synthetic:test", "--output", str(tmp_path / "ev")]) == 2
    assert "switchkd convert gguf" in capsys.readouterr().err


def test_records_in_another_shape_point_at_data_fields_and_sharegpt_reads(tmp_path, capsys):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Q?", "answer": "A."}) + "\n")
    assert main(["train", "tiny/sft", f"data.train={qa}", "data.format=minillm", "data.dev=null",
                 f"output.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the record has answer, question" in err[0] and "data.fields={instruction: question" in err[0]
    from switchkd.config import DataConfig
    from switchkd.data import load_examples

    share = tmp_path / "sharegpt.jsonl"
    share.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]})
                     + "\n")

    class Tok:  # a chat template only
        chat_template = "x"

        @staticmethod
        def apply_chat_template(msgs, tokenize=False, add_generation_prompt=True):
            return "".join(f"<{m['role']}>{m['content']}" for m in msgs) + "<assistant>"

    [example] = load_examples(str(share), DataConfig(), Tok())
    assert example.prompt == "<user>Hi?<assistant>" and example.references == ["Hello."]


# -- 9. parameter counts; model cards --------------------------------------------------------------------------------

@needs_tokenizer
def test_shrink_prints_the_students_parameter_count(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from tests.vllm_models import build

    teacher = build(tmp_path / "teacher", layers=4)
    assert main(["shrink", str(teacher), str(tmp_path / "student"), "--layers", "2", "--even"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp_path / "student").parameters())
    t = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(teacher).parameters())
    assert f"{n / 1e6:.1f}M parameters (teacher {t / 1e6:.1f}M)" in line


def test_saved_models_carry_a_model_card_and_push_to_hub_uploads_final(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    calls = []

    class Api:
        def create_repo(self, repo, private=True, exist_ok=False):
            calls.append(("create", repo, private))
            return f"https://huggingface.co/{repo}"

        def upload_folder(self, folder_path, repo_id, commit_message=""):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    out = tmp_path / "run"
    assert main(["train", "tiny/kd", *FAST, "train.max_steps=2", "train.eval_every=1", "train.dev_rouge=2",
                 "eval.limit=4", "output.push_to_hub=me/tiny-kd", f"output.dir={out}"]) == 0
    card = (out / "final" / "README.md").read_text()
    meta = card.split("---")[1]
    assert "library_name: transformers" in meta and "- switchkd" in meta and "- kd" in meta
    assert "| method | kd (sequences: dataset, per-token loss: fkl) |" in card and "| teacher | tiny:gpt2" in card
    assert "## Dev figures" in card and "| 1 |" in card
    assert calls[0] == ("create", "me/tiny-kd", True) and calls[1][0] == "upload" and "README.md" in calls[1][2]
    printed = capsys.readouterr()
    assert "uploaded to https://huggingface.co/me/tiny-kd" in printed.out + printed.err


# -- two inputs the hardening missed ------------------------------------------------------------------------------------

def test_a_model_folder_without_tokenizer_files_is_one_line(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, bos_token_id=1,
                               eos_token_id=1)).save_pretrained(tmp_path / "m")
    capsys.readouterr()
    for argv in (["train", "tiny/sft", f"model.name={tmp_path / 'm'}", f"output.dir={tmp_path / 'run'}"],
                 ["eval", "--model", str(tmp_path / "m"), "--data", "synthetic:test", "--output", str(tmp_path / "ev")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "empty (no tokenizer files there?)" in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "ev").exists()


@pytest.mark.parametrize("text", ['{"instruction": "a", "output": "b"}\n', '{\n "instruction": "a",\n "output": "b"\n}\n'])
def test_a_json_file_holding_one_object_is_refused_by_eval_as_by_train(tmp_path, capsys, text):
    data = tmp_path / "one.json"
    data.write_text(text)
    for argv in (["eval", "--model", "tiny:gpt2", "--data", str(data), "--output", str(tmp_path / "ev")],
                 ["train", "tiny/sft", f"data.train={data}", "data.dev=null", f"output.dir={tmp_path / 'run'}"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds one JSON object" in err[0], err


@pytest.mark.parametrize("key, line", [("teacher.top_k=30", "teacher.top_k=30 applies to a teacher on a vLLM server"),
                                       ("teacher.retries=2", "teacher.retries=2 applies"),
                                       ("output.hub_private=false", "output.hub_private=false applies to output.push_to_hub")])
def test_keys_the_run_would_not_use_are_refused(tmp_path, capsys, key, line):
    assert main(["train", "tiny/kd", key, f"output.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and line in err[0], err


# -- 2. the data: databricks-dolly-15k as published trains as it is ------------------------------------------------------

def test_databricks_dolly_records_train_as_they_are(tmp_path):
    rows = [{"instruction": f"Say {i}.", "context": "" if i % 2 else "Some context.", "response": f"{i}.",
             "category": "open_qa"} for i in range(16)]
    data = tmp_path / "databricks-dolly-15k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "tiny/sft", f"data.train={data}", "data.dev=null", "train.max_steps=2", "train.batch_size=4",
                 "data.max_prompt_length=256", "data.max_length=320", f"output.dir={out}"]) == 0
    assert (out / "final" / "README.md").is_file()

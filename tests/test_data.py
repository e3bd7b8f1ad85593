"""Data formats, prompt templates, the length policy, batching and bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch

from switchkd.config import ConfigError, DataConfig
from switchkd.data import ALPACA, ALPACA_INPUT, collate, load_examples, tokenize
from switchkd.models import tiny_tokenizer

TOK = tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_minillm_format_uses_template_and_list_references(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "input": "", "output": ["hi", "hello"]},
                                           {"instruction": "Add", "input": "1 1", "output": "2"}])
    ex = load_examples(f, DataConfig(), TOK)
    assert ex[0].prompt == ALPACA.format(instruction="Say hi") and ex[0].references == ["hi", "hello"]
    assert ex[1].prompt == ALPACA_INPUT.format(instruction="Add", input="1 1")


def test_minillm_shared_prompt_matches_template(shared):
    ex = load_examples(str(shared / "data/minillm_data/dolly/valid.jsonl"), DataConfig(), TOK, limit=50)
    rows = [json.loads(line) for line in open(shared / "data/minillm_data/dolly/valid.jsonl")][:50]
    from switchkd.data import render_prompt

    for e, r in zip(ex, rows):
        assert e.prompt == render_prompt("alpaca", r["instruction"], r["input"])


def test_dolly_and_field_mapping(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Q", "context": "C", "response": "R", "category": "qa"}])
    ex = load_examples(f, DataConfig(), TOK)
    assert ex[0].references == ["R"] and "### Input:\nC" in ex[0].prompt and ex[0].meta == {"category": "qa"}
    g = write_jsonl(tmp_path / "m.jsonl", [{"question": "Q?", "answer": "A."}])
    ex = load_examples(g, DataConfig(fields={"instruction": "question", "output": "answer"}), TOK)
    assert ex[0].references == ["A."] and "Q?" in ex[0].prompt


def test_messages_format_uses_chat_template(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    ex = load_examples(f, DataConfig(), tok)
    assert ex[0].prompt == "<user>hi<assistant>" and ex[0].references == ["yo"]


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: invalid JSON line"):
        load_examples(str(p), DataConfig(), TOK)


def test_missing_field_names_it_and_formats(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(ConfigError, match=r"x.jsonl:2: missing field 'output'"):
        load_examples(f, DataConfig(), TOK)
    g = write_jsonl(tmp_path / "y.jsonl", [{"foo": 1}])
    with pytest.raises(ConfigError, match=r"none of the accepted formats match \(minillm: instruction, output"):
        load_examples(g, DataConfig(), TOK)


def test_empty_dataset_and_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="empty dataset"):
        load_examples(str(tmp_path / "e.jsonl"), DataConfig(), TOK)
    with pytest.raises(ConfigError, match="not found"):
        load_examples(str(tmp_path / "nope.jsonl"), DataConfig(), TOK)


def test_length_policy_drops_long_prompts_and_truncates_responses(tmp_path):
    f = write_jsonl(tmp_path / "l.jsonl", [{"instruction": "x" * 50, "output": "ok"},
                                           {"instruction": "short", "output": "y" * 100},
                                           {"instruction": "short", "output": "fine"}])
    ex = load_examples(f, DataConfig(template="none"), TOK)
    items, stats = tokenize(ex, TOK, max_prompt=20, max_length=40)
    assert (stats.total, stats.kept, stats.dropped_long_prompt, stats.truncated_response) == (3, 2, 1, 1)
    assert len(items[0].prompt) + len(items[0].response) == 40
    assert items[1].response[-1] == TOK.eos_token_id


def test_collate_masks_prompt_and_padding():
    from switchkd.data import Tokenized

    batch = collate([Tokenized([5, 6, 7], [8, 1], 0), Tokenized([5], [9, 10, 1], 1)], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 1], [5, 9, 10, 1, 0]]
    assert batch.labels.tolist() == [[-100, -100, -100, 8, 1], [-100, 9, 10, 1, -100]]
    assert batch.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 5]]
    assert batch.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert torch.equal(batch.attention_mask, (batch.input_ids != 0).long() | torch.tensor([[0] * 5, [0] * 5]))


def test_synthetic_splits_are_disjoint_and_deterministic():
    from switchkd.synthetic import make_split

    train = {e.instruction for e in make_split("train", 800)}
    test = make_split("test", 100)
    assert not train & {e.instruction for e in test}
    assert [e.references for e in make_split("test", 100)] == [e.references for e in test]
    assert max(len(e.references[0]) for e in test) >= 100 and min(len(e.references[0]) for e in test) <= 10


def test_chat_template_for_instruction_records(tmp_path):
    """data.template=chat renders instruction (+ input) as one user turn through the tokenizer's chat
    template; a tokenizer without one is a one-line error naming the file."""
    from switchkd.config import ConfigError, DataConfig
    from switchkd.data import load_examples
    from switchkd.models import tiny_tokenizer

    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"instruction": "Add 2 and 3.", "input": "Be brief.", "output": "5"}) + "\n")
    tok = tiny_tokenizer()
    with pytest.raises(ConfigError, match="d.jsonl.*data.template=chat needs a tokenizer with a chat template"):
        load_examples(str(f), DataConfig(template="chat"), tok)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    ex = load_examples(str(f), DataConfig(template="chat"), tok)[0]
    assert ex.prompt == "<user>Add 2 and 3.\n\nBe brief.<assistant>" and ex.references == ["5"]

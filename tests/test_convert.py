"""llama2.c -> Hugging Face conversion, checked against the stored stories260K model's known output."""

from __future__ import annotations

import struct

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from switchkd.cli import main
from switchkd.data import encode_prompt

KNOWN = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
         "she saw a big, red ball. She wanted to play with it, but it was too high")


@pytest.fixture(scope="module")
def stories(shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("stories")
    d = shared / "models/stories260K"
    assert main(["convert", "llama2c", str(d / "stories260K.bin"), str(d / "tok512.bin"), str(out)]) == 0
    return out


def test_converted_model_reproduces_known_greedy_output(stories):
    model = AutoModelForCausalLM.from_pretrained(stories)
    tok = AutoTokenizer.from_pretrained(stories)
    assert model.config.tie_word_embeddings and model.config.rms_norm_eps == 1e-5
    out = model.generate(torch.tensor([[1]]), max_new_tokens=60, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True) == KNOWN


@pytest.mark.parametrize("text", [KNOWN, "Tom said: \"Hi!\"  Two  spaces.\nNew line, café ☃ 42.", " leading space", "x"])
def test_tokenizer_round_trips(stories, text):
    tok = AutoTokenizer.from_pretrained(stories)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert all(i < 512 for i in ids)


def test_tokenizer_adds_bos_and_merges_common_words(stories):
    tok = AutoTokenizer.from_pretrained(stories)
    assert encode_prompt(tok, "Once upon a time")[0] == 1
    assert len(tok("Once upon a time", add_special_tokens=False)["input_ids"]) <= 6  # words, not bytes
    assert tok.eos_token_id == 2 and tok.unk_token_id == 0


def test_bad_files_are_clear_errors(tmp_path, shared, capsys):
    bad = tmp_path / "m.bin"
    bad.write_bytes(struct.pack("<7i", 64, 172, 5, 8, 4, 512, 512) + b"\0" * 100)
    tok = shared / "models/stories260K/tok512.bin"
    assert main(["convert", "llama2c", str(bad), str(tok), str(tmp_path / "o")]) == 2
    assert "expected" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (tmp_path / "t.bin").write_bytes(b"\x07\0\0\0garbage")
    assert main(["convert", "llama2c", str(shared / "models/stories260K/stories260K.bin"), str(tmp_path / "t.bin"),
                 str(tmp_path / "o")]) == 2
    assert "not a llama2.c tokenizer" in capsys.readouterr().err


def test_convert_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    from switchkd.cli import main

    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 31)
    existing = tmp_path / "file"
    existing.write_text("mine")
    for argv, fragment in ((["convert", "llama2c", str(odd), str(odd), str(tmp_path / "o1")], "28-byte header"),
                           (["convert", "llama2c", str(tmp_path / "missing.bin"), str(odd), str(tmp_path / "o2")],
                            "no such file"),
                           (["convert", "llama2c", str(odd), str(odd), str(existing)], "already exists")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("switchkd: error:") and fragment in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "odd.bin"] and existing.read_text() == "mine"

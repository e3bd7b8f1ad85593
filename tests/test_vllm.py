"""vLLM: a teacher on a real vLLM server (``teacher.server``, ``switchkd serve-teacher``) against transformers and the
teacher in the process; the sparse teacher's divergences; bad servers.  (The student's rollouts on a vLLM engine:
tests/test_vllm_engine.py; a server killed and restarted mid-run: tests/test_vllm_restart.py.)

The suite starts one real server (``tests/conftest.py``: a tiny Llama with GPT-2's tokenizer, fp32) when vLLM is
installed; these tests wait for it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from switchkd.batch import Batch
from switchkd.cli import main
from switchkd.config import DecodingConfig
from switchkd.divergences import DIVERGENCES, SERVED, TopKTail, divergence, with_tail
from switchkd.served import ServedTeacher, ServerError
from tests.vllm_models import DISTILLM, build, free_port


def _tok(teacher: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher)


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _batch(tok) -> Batch:
    prompts = [tok("Tell me a story about", add_special_tokens=False)["input_ids"],
               tok("Two plus two is", add_special_tokens=False)["input_ids"], [464, 3290]]
    responses = [tok(" a dog.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                 tok(" four", add_special_tokens=False)["input_ids"], [11, 12, 13, 14, 15, 16]]
    return Batch.build(prompts, responses, tok.eos_token_id, [0, 1, 2])


# -- the sparse teacher: k + 1 outcomes ------------------------------------------------------------------------------

def test_every_divergence_declares_how_it_reads_a_served_teacher_or_is_refused():
    assert set(SERVED) <= set(DIVERGENCES)
    assert "bild" not in SERVED  # its student-led half needs the teacher's logits at the student's top k


@pytest.mark.parametrize("name", [n for n, how in SERVED.items() if how == "bucket"])
def test_bucketed_divergence_equals_float64_brute_force(name):
    """Against the divergence over k + 1 outcomes built by hand in float64 (both sides' tail = 1 - their top k)."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 40, generator=g, dtype=torch.float64) * 2
    t = torch.randn(5, 40, generator=g, dtype=torch.float64) * 3
    lp = torch.log_softmax(t, -1)
    top = lp.topk(7, -1)
    teacher = TopKTail(top.values, top.indices, 40, None)
    got = divergence(name, s, teacher, temperature=1.0)
    q = torch.softmax(s, -1)
    p_top, q_top = top.values.exp(), q.gather(-1, top.indices)
    p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    qq = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    want = DIVERGENCES[name](qq.log(), p.log())  # the registry's function on the k + 1 outcomes
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    brute = {"fkl": kl(p, qq), "rkl": kl(qq, p), "tvd": 0.5 * (p - qq).abs().sum(-1)}
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    if name in brute:
        torch.testing.assert_close(got, brute[name], rtol=1e-9, atol=1e-12)


def test_bucketed_student_gradient_reaches_the_tail_tokens():
    s = torch.randn(3, 30, dtype=torch.float64, requires_grad=True)
    lp = torch.log_softmax(torch.randn(3, 30, dtype=torch.float64), -1)
    top = lp.topk(5, -1)
    lq, lpp = with_tail(s, TopKTail(top.values, top.indices, 30, None))
    assert torch.allclose(lq.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(lpp.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    divergence("fkl", s, TopKTail(top.values, top.indices, 30, None)).sum().backward()
    outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, top.indices, False)
    assert (s.grad[outside].abs() > 0).all()


# -- a real server ------------------------------------------------------------------------------------------------

def test_served_targets_equal_the_teacher_in_the_process(vllm_server):
    url, teacher_dir = vllm_server
    tok, model = _tok(teacher_dir), _model(teacher_dir)
    served = ServedTeacher(url, tok, top_k=20)
    served.check(len(tok), reference=lambda ids: torch.log_softmax(model(torch.tensor([ids])).logits[0], -1).detach())
    b = _batch(tok)
    got = served.targets(b, len(tok))
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    mask = b.labels[:, 1:] != -100
    lp = torch.log_softmax(logits[:, :-1][mask], -1)
    target = b.labels[:, 1:][mask]
    assert got.logp.shape == (int(mask.sum()), 20)
    assert (got.logp - lp.gather(-1, got.ids)).abs().max() <= 1e-4
    assert (got.logp - lp.topk(20, -1).values).abs().max() <= 1e-4  # the 20 largest, in order
    assert (got.token_logp - lp.gather(-1, target[:, None]).squeeze(-1)).abs().max() <= 1e-4
    assert served.requests >= 1


def test_served_greedy_samples_equal_hf_generate(vllm_server):
    url, teacher_dir = vllm_server
    tok, model = _tok(teacher_dir), _model(teacher_dir)
    served = ServedTeacher(url, tok)
    served.check(len(tok))
    prompts = _batch(tok).prompts()
    got = served.sample(prompts, 12, DecodingConfig(do_sample=False), tok.eos_token_id)
    for p, r in zip(prompts, got):
        want = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        assert r == want[0, len(p):].tolist()
    again = served.sample(prompts, 12, DecodingConfig(), tok.eos_token_id, seed=5)
    assert again == served.sample(prompts, 12, DecodingConfig(), tok.eos_token_id, seed=5)  # seeded: repeatable
    assert again[0] != again[1] or prompts[0] == prompts[1]


def test_served_next_tokens_give_the_teachers_top_k_and_its_token(vllm_server):
    """One sampled step per prompt (the served SWITCH gate's request): the top 20 raw log-probabilities equal the
    in-process teacher's at the prompt's end (also at temperature 2: raw, before temperature), greedy gives its
    argmax, and a seeded sampled step is repeatable."""
    url, teacher_dir = vllm_server
    tok, model = _tok(teacher_dir), _model(teacher_dir)
    served = ServedTeacher(url, tok, top_k=20)
    served.check(len(tok))
    prompts = _batch(tok).prompts()
    for decoding in (DecodingConfig(do_sample=False), DecodingConfig(temperature=2.0, top_k=0, top_p=1.0)):
        got = served.next_tokens(prompts, decoding, tok.eos_token_id, seed=3)
        for p, (token, ids, logp) in zip(prompts, got):
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([p])).logits[0, -1], -1)
            assert (torch.tensor(logp) - lp.topk(20).values).abs().max() <= 1e-4
            assert (torch.tensor(logp) - lp[torch.tensor(ids)]).abs().max() <= 1e-4
            if not decoding.do_sample:
                assert token == int(lp.argmax())
    assert got == served.next_tokens(prompts, decoding, tok.eos_token_id, seed=3)


def _train(tmp_path: Path, teacher: Path, url: str, preset: str, *extra: str, student: Path | None = None) -> list:
    """``switchkd train`` of a tiny preset's method with the suite's teacher on the server; the metrics' records."""
    student = student or build(tmp_path / "student", layers=1, seed=1)
    out = tmp_path / "run"
    rc = main(["train", preset, f"model.name={student}", f"teacher.name={teacher}", f"teacher.server={url}",
               "teacher.top_k=20", "data.train=synthetic", "data.synthetic_size=32", "data.max_length=96",
               "data.max_prompt_length=48", "method.max_new_tokens=12", "train.max_steps=3", "train.batch_size=4",
               "train.lr=3e-3", "train.eval_every=0", "train.save_every=0", "train.loss_chunk=0", "data.dev=null",
               "train.log_every=1",
               f"output.dir={out}", *extra])
    assert rc == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny/kd", "tiny/gkd", "tiny/seqkd", "tiny/distillm", "tiny/imitkd"])
def test_methods_train_with_a_served_teacher(vllm_server, tmp_path, preset):
    url, teacher = vllm_server
    records = _train(tmp_path, teacher, url, preset, *(DISTILLM if preset == "tiny/distillm" else []))
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.slow
def test_kd_with_a_served_teacher_learns_the_teacher(vllm_server, tmp_path):
    """Word-level KD against the served top 20 moves the student towards the teacher: on 8 fixed examples seen
    every step, the divergence over the k + 1 outcomes falls."""
    url, teacher = vllm_server
    records = _train(tmp_path, teacher, url, "tiny/kd", "train.max_steps=10", "data.synthetic_size=8",
                     "train.batch_size=8", "train.lr=1e-2", "train.scheduler=constant", "train.warmup_steps=0")
    assert records[-1]["loss"] < 0.7 * records[0]["loss"], [r["loss"] for r in records]


def test_generate_samples_from_the_server(vllm_server, tmp_path):
    url, teacher = vllm_server
    out = tmp_path / "seqkd.jsonl"
    rc = main(["generate", "tiny/seqkd", f"teacher.name={teacher}", f"teacher.server={url}", "data.train=synthetic",
               "data.limit=6", "data.max_length=96", "data.max_prompt_length=48", "method.max_new_tokens=8",
               "--output", str(out)])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 6 and all(set(r) >= {"prompt", "output"} for r in rows)


# -- bad servers: one line, exit 2, before the first step -------------------------------------------------------------

def _refused(tmp_path: Path, capsys, teacher: Path, url: str, *extra: str) -> str:
    student = build(tmp_path / "student", layers=1, seed=1)
    rc = main(["train", "tiny/kd", f"model.name={student}", f"teacher.name={teacher}", f"teacher.server={url}",
               "data.train=synthetic", "data.synthetic_size=16", "train.max_steps=1", "train.batch_size=4",
               f"output.dir={tmp_path / 'run'}", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("switchkd: error: "), err
    assert not (tmp_path / "run" / "final").exists()
    return err[0]


def test_nothing_listening_is_one_line(vllm_server, tmp_path, capsys):
    _, teacher = vllm_server
    line = _refused(tmp_path, capsys, teacher, f"http://127.0.0.1:{free_port()}")
    assert "nothing answers there" in line and "serve-teacher" in line


def test_max_logprobs_below_top_k_is_one_line(vllm_server, tmp_path, capsys):
    url, teacher = vllm_server
    line = _refused(tmp_path, capsys, teacher, url, "teacher.top_k=60")  # the suite's server: --max-logprobs 50
    assert "--max-logprobs 60" in line and "teacher.top_k=60" in line


def test_a_server_with_another_tokenizer_is_one_line(vllm_server, tmp_path, capsys):
    """The config's teacher (and student) use a tokenizer with one more token than the served teacher's."""
    url, teacher = vllm_server
    other = build(tmp_path / "other", layers=1, seed=2)
    tok = _tok(other)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    student = tmp_path / "student"
    build(student, layers=1, seed=1)
    tok.save_pretrained(student)
    line = _refused(tmp_path, capsys, other, url)
    assert "vocabulary" in line or "tokenizer" in line


def test_a_url_that_is_not_a_vllm_server_is_one_line(vllm_server, tmp_path, capsys):
    """An HTTP server that answers something else (here: Python's file server)."""
    _, teacher = vllm_server
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time
        import urllib.request

        for _ in range(50):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        line = _refused(tmp_path, capsys, teacher, f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait()
    assert "not a vLLM OpenAI-compatible server" in line


def test_transient_errors_are_retried_then_one_line():
    class Flaky(ServedTeacher):
        calls = 0

        def _call(self, path, payload=None, timeout=None):
            from switchkd.served import _Transient

            Flaky.calls += 1
            if Flaky.calls < 3:
                raise _Transient("ConnectionResetError: reset")
            return {"ok": True}

    waits = []
    client = Flaky("http://127.0.0.1:9", tokenizer=None, sleep=waits.append)
    assert client.request("/x", {}) == {"ok": True} and waits == [1.0, 2.0]
    Flaky.calls = -100
    with pytest.raises(ServerError, match="not reachable after 5 attempts"):
        client.request("/x", {})


def test_serve_teacher_refuses_a_gguf_file_and_a_missing_directory(tmp_path, capsys):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert main(["serve-teacher", str(f)]) == 2
    assert "switchkd convert gguf" in capsys.readouterr().err
    assert main(["serve-teacher", str(tmp_path / "nope" / "model")]) == 2
    assert "no config.json" in capsys.readouterr().err

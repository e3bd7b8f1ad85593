"""vLLM: a teacher on a real vLLM server (``teacher.server``, ``switchkd serve-teacher``) and the student's rollouts
on a vLLM engine (``method.decoding.engine=vllm``), against transformers and switchkd's own engine.

The suite starts one real server (``tests/conftest.py``: a tiny Llama with GPT-2's tokenizer, fp32) when vLLM is
installed; these tests wait for it.  The in-process vLLM engine runs in subprocesses (vLLM binds the process's
threads to cores)."""

from __future__ import annotations

import json
import math
import os
import socket
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
from tests.vllm_models import build

ROOT = Path(__file__).resolve().parents[1]


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


#: DistiLLM with student samples from the first step, its dev CE measured on a small dev set
DISTILLM = ["method.distillm.init_student_prob=1.0", "data.dev=synthetic:dev", "eval.limit=4",
            "method.distillm.validate=eval_every", "method.distillm.dev_limit=4", "train.eval_every=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    line = _refused(tmp_path, capsys, teacher, f"http://127.0.0.1:{_free_port()}")
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
    port = _free_port()
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


# -- the student's rollouts on an in-process vLLM engine ---------------------------------------------------------------

def _script(tmp_path: Path, body: str) -> dict:
    """Run ``body`` (Python, printing one JSON line last) in a fresh process; its JSON."""
    path = tmp_path / "script.py"
    path.write_text(body)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


ENGINE_CHECKS = """
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from switchkd.config import DecodingConfig
from switchkd.data import left_pad
from switchkd.drafted import drafted_rollout
from switchkd.rollout import Gate, Rank, RolloutConfig, StudentWrites, rollout
from switchkd.vllm_engine import VLLMStudent
STUDENT, TEACHER = {student!r}, {teacher!r}
tok = AutoTokenizer.from_pretrained(STUDENT)
seq = [464, 3290, 318, 257, 922, 13, 632]
found = {{}}

def gap(served, model):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0], -1)
    return max(abs(v - float(lp[j - 1, t])) for j, e in enumerate(served) if e for t, v in e.items())

# 1. current weights after optimizer steps; the distribution of its samples at T = 1
model = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32)
engine = VLLMStudent(model, tok, 128, seed=0)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
gaps = []
for step in range(3):
    model(torch.tensor([seq]), labels=torch.tensor([seq])).loss.backward(); opt.step(); opt.zero_grad()
    gaps.append(gap(engine.logprobs(seq, 5), model))
prompt, n = [464, 3290], 600
first_vllm = [r[0] for r in engine.sample([prompt] * n, 1, DecodingConfig(), tok.eos_token_id, seed=11)]
ids = torch.tensor([prompt] * n)
out = rollout(model.eval(), None, ids, torch.ones_like(ids), RolloutConfig(max_new_tokens=1, seed=3,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, vocab_size=len(tok)), StudentWrites())
with torch.no_grad():
    p = torch.softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
found["weights"] = {{"gaps": gaps, "syncs": engine.syncs, "vllm": first_vllm,
                    "own": out.sequences[:, len(prompt)].tolist(), "p": p.tolist()}}
del engine

# 2. SWITCH's and SKD's decisions over vLLM drafts (greedy) against the in-process engine's
student = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32).eval()
teacher = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
engine = VLLMStudent(student, tok, 128, seed=0)
ids, mask = left_pad([[464, 3290, 318], [40, 588, 257, 922, 1110, 13, 50, 11], [7454]], tok.eos_token_id)
found["drafts"] = {{}}
for gate, shift in (("jsd", 0.0), ("rank", 0.5)):
    cfg = RolloutConfig(max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.eos_token_id, vocab_size=len(tok), seed=1)
    never = Rank(top_k=float("inf")) if gate == "rank" else Gate(tau0=float("inf"), schedule="const", divergence=gate)
    free = rollout(student, teacher, ids, mask, cfg, never)  # the student writes all: tau0 = its median gate (+ 0.5)
    tau0 = float(free.gate[free.response_mask].median()) + shift
    rule = Rank(top_k=tau0 + 0.5) if gate == "rank" else Gate(tau0=tau0, schedule="const", divergence=gate)
    own = rollout(student, teacher, ids, mask, cfg, rule)
    drafted = drafted_rollout(engine, student, teacher, ids, mask, cfg, rule)
    m = own.response_mask
    found["drafts"][gate] = {{"tokens": torch.equal(own.sequences, drafted.sequences),
                             "writers": torch.equal(own.from_teacher, drafted.from_teacher),
                             "gate": float((own.gate[m] - drafted.gate[m]).abs().max()),
                             "gate_differs": float(((own.gate[m] - drafted.gate[m]).abs() > 1e-4).float().mean()),
                             "teacher_share": float(own.from_teacher[m].float().mean())}}
del engine

# 3. a peft LoRA student: its adapters reach the engine merged
from peft import LoraConfig, get_peft_model
base = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32)
with torch.no_grad():
    before = torch.log_softmax(base(torch.tensor([seq])).logits[0], -1)
model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
engine = VLLMStudent(model, tok, 128, seed=0)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
for step in range(2):
    model(torch.tensor([seq]), labels=torch.tensor([seq])).loss.backward(); opt.step(); opt.zero_grad()
served = engine.logprobs(seq, 5)
moved = max(abs(v - float(before[j - 1, t])) for j, e in enumerate(served) if e for t, v in e.items())
found["lora"] = {{"gap": gap(served, model), "moved": moved, "syncs": engine.syncs}}
print(json.dumps(found))
"""


@pytest.fixture(scope="session")
def engine_checks(vllm_server, tmp_path_factory) -> dict:
    """One process (vLLM in the process binds its threads; one engine start-up per check would triple the cost)
    running the in-process vLLM engine's three checks on a 1-block student: its log-probabilities against the
    student's after optimizer steps and its samples' distribution, SWITCH's and SKD's decisions over its drafts,
    and a LoRA student's merged weights."""
    _, teacher = vllm_server
    where = tmp_path_factory.mktemp("engine")
    student = build(where / "student", layers=1, seed=1, init=0.6)
    return _script(where, ENGINE_CHECKS.format(student=str(student), teacher=str(teacher)))


@pytest.mark.slow
@pytest.mark.xdist_group("vllm-engine")
def test_vllm_rollouts_use_the_students_current_weights_and_its_distribution(engine_checks):
    """After optimizer steps the engine's log-probabilities of a fixed sequence equal the student's own (<= 1e-4);
    at T = 1 its samples follow the student's distribution (first tokens of one prompt against switchkd's engine:
    a chi-square test on the most frequent tokens)."""
    out = engine_checks["weights"]
    assert out["syncs"] == 3 and max(out["gaps"]) <= 1e-4
    p = torch.tensor(out["p"], dtype=torch.float64)
    top = p.topk(6).indices.tolist()  # cells: the six most likely tokens and the rest
    critical = 22.458  # the chi-square distribution's 0.999 quantile at 6 degrees of freedom

    for sample in (out["vllm"], out["own"]):
        counts = [sum(1 for t in sample if t == c) for c in top]
        counts.append(len(sample) - sum(counts))
        expected = [float(p[c]) * len(sample) for c in top] + [float(1 - p[top].sum()) * len(sample)]
        stat = sum((o - e) ** 2 / e for o, e in zip(counts, expected))
        assert stat < critical, (counts, expected)


@pytest.mark.slow
@pytest.mark.xdist_group("vllm-engine")
def test_a_lora_students_merged_weights_reach_the_engine(engine_checks):
    """A peft LoRA student: after optimizer steps on its adapters the engine's log-probabilities equal the adapted
    student's (<= 1e-4) and differ from the base model's (the adapters reached the engine merged)."""
    out = engine_checks["lora"]
    assert out["syncs"] == 1 and out["gap"] <= 1e-4 and out["moved"] > 1e-2, out


@pytest.mark.slow
@pytest.mark.xdist_group("vllm-engine")
def test_vllm_drafts_are_decided_as_the_in_process_engine_decides(engine_checks):
    """SWITCH and SKD with the student's drafts from a real vLLM engine (greedy): the tokens, the writers and the
    gate equal switchkd's draft-and-verify engine's on the same models."""
    for gate, r in engine_checks["drafts"].items():
        assert r["tokens"] and r["writers"], (gate, r)
        # SKD's rank counts teacher logits above the draft's: a near-tie (1e-7) may order differently in a block
        # forward than in a one-token step, moving a rank by one at a rare position without changing a decision
        assert r["gate"] <= 1e-4 if gate == "jsd" else (r["gate"] <= 1 and r["gate_differs"] <= 0.03), (gate, r)
        assert 0 < r["teacher_share"] < 1, (gate, r)  # both models wrote


@pytest.mark.slow
@pytest.mark.parametrize("preset, extra", [
    ("tiny/distillm", DISTILLM), ("tiny/minillm", ["teacher.server", "method.minillm.ppo_epochs=2"]),
    ("tiny/switch", ["teacher.server"]),
], ids=["distillm", "minillm-server", "switch-server"])
def test_methods_train_with_rollouts_on_vllm(vllm_server, tmp_path, preset, extra):
    """DistiLLM, MiniLLM and SWITCH with ``method.decoding.engine=vllm`` (in a subprocess: vLLM in the training
    process; GKD: the two-process test above); MiniLLM and SWITCH with the teacher on the server too (SKD's rank gate, in process and served:
    tests/test_drafted.py and the drafts test above)."""
    url, teacher = vllm_server
    student = build(tmp_path / "student", layers=1, seed=1)
    out = tmp_path / "run"
    extra = [f"teacher.server={url}" if x == "teacher.server" else x for x in extra]
    args = ["train", preset, f"model.name={student}", f"teacher.name={teacher}", "method.decoding.engine=vllm",
            "data.train=synthetic", "data.synthetic_size=32", "data.max_length=96", "data.max_prompt_length=48",
            "method.max_new_tokens=12", "train.max_steps=3", "train.batch_size=4", "train.eval_every=0",
            "train.save_every=0", "train.loss_chunk=0", "data.dev=null", "train.log_every=1", f"output.dir={out}", *extra]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    res = subprocess.run([sys.executable, "-m", "switchkd", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.slow
def test_each_process_samples_its_share_on_its_own_vllm_engine(vllm_server, tmp_path):
    """GKD with every batch the student's greedy samples from vLLM, under ``switchkd launch`` (2 processes, DDP, batch
    2 each): each process holds its own engine with the student's current weights and samples its own micro-batches'
    prompts, so the final weights equal one process with batch 4 (a process sampling the other's prompts, or from
    stale weights, would train on other sequences)."""
    from safetensors.torch import load_file

    _, teacher = vllm_server
    student = build(tmp_path / "student", layers=1, seed=1)
    common = ["tiny/gkd", f"model.name={student}", f"teacher.name={teacher}", "method.decoding.engine=vllm",
              "method.decoding.do_sample=false", "method.mixture.student_ratio=1", "data.train=synthetic",
              "data.synthetic_size=32", "data.max_length=96", "data.max_prompt_length=48", "method.max_new_tokens=12",
              "train.max_steps=3", "train.eval_every=0", "train.save_every=0", "train.loss_chunk=0", "data.dev=null",
              "train.log_every=1", "train.lr=1e-2"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    one = subprocess.run([sys.executable, "-m", "switchkd", "train", *common, "train.batch_size=4",
                          f"output.dir={tmp_path / 'one'}"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "switchkd", "launch", *common, "train.batch_size=2",
                          f"output.dir={tmp_path / 'two'}", "--accelerate", str(ROOT / "configs/accelerate/ddp.yaml"),
                          "--num-processes", "2", f"--launch-arg=--main_process_port={port}"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "distributed: 2 processes" in two.stdout
    a = load_file(tmp_path / "one/final/model.safetensors")
    b = load_file(tmp_path / "two/final/model.safetensors")
    moved = load_file(student / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert max(float((a[k] - moved[k]).abs().max()) for k in a if k in moved) > 1e-3  # it trained


@pytest.mark.parametrize("args, expected", [
    (["tiny/switch", "teacher.server=http://127.0.0.1:9"], "set method.decoding.engine=vllm"),
    (["tiny/minillm", "teacher.server=http://127.0.0.1:9"], "set method.decoding.engine=vllm"),
    (["tiny/skd", "teacher.server=http://127.0.0.1:9", "method.decoding.engine=vllm", "method.skd.top_k=30"],
     "raise teacher.top_k"),
    (["tiny/minillm", "method.decoding.engine=vllm", "method.decoding.temperature=0.7"], "temperature=1"),
])
def test_rollouts_the_served_or_vllm_path_cannot_reproduce_are_one_line(tmp_path, capsys, args, expected):
    assert main(["train", *args, f"output.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("switchkd: error: config error:") and expected in err[0], err
    assert not (tmp_path / "run").exists()

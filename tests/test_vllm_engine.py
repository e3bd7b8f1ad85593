"""vLLM: the student's rollouts on an in-process vLLM engine (``method.decoding.engine=vllm``) against the student in
the process and switchkd's own engine: current weights after optimizer steps, the samples' distribution, SWITCH's and
SKD's decisions over vLLM drafts, LoRA students, methods training on it, one engine per process under ``switchkd
launch``.  The engine runs in subprocesses (vLLM binds the process's threads to cores); the suite's real server
(``tests/conftest.py``) holds the teacher where a test serves it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from switchkd.cli import main
from tests.vllm_models import DISTILLM, build, free_port

ROOT = Path(__file__).resolve().parents[1]


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


#: the rollout trainings on vLLM: case -> (preset, extra overrides; "teacher.server" stands for the suite's URL)
ROLLOUT_CASES = {
    "distillm": ("tiny/distillm", DISTILLM),
    "minillm-server": ("tiny/minillm", ["teacher.server", "method.minillm.ppo_epochs=2"]),
    "switch-server": ("tiny/switch", ["teacher.server"]),
}

ROLLOUT_TRAININGS = """
import json
from switchkd.cli import main
print(json.dumps({{case: main(args) for case, args in json.loads({cases!r}).items()}}))
"""


@pytest.fixture(scope="session")
def vllm_rollout_trainings(vllm_server, tmp_path_factory) -> dict:
    """DistiLLM, MiniLLM and SWITCH trained with ``method.decoding.engine=vllm`` one after the other in one fresh
    process (vLLM in the training process; one import of vLLM for the three); ``case -> (exit status, its output
    directory)``."""
    url, teacher = vllm_server
    where = tmp_path_factory.mktemp("rollouts")
    student = build(where / "student", layers=1, seed=1)
    cases = {}
    for case, (preset, extra) in ROLLOUT_CASES.items():
        extra = [f"teacher.server={url}" if x == "teacher.server" else x for x in extra]
        cases[case] = ["train", preset, f"model.name={student}", f"teacher.name={teacher}",
                       "method.decoding.engine=vllm", "data.train=synthetic", "data.synthetic_size=32",
                       "data.max_length=96", "data.max_prompt_length=48", "method.max_new_tokens=12", "train.max_steps=3",
                       "train.batch_size=4", "train.eval_every=0", "train.save_every=0", "train.loss_chunk=0",
                       "data.dev=null", "train.log_every=1", *extra, f"output.dir={where / case}"]
    status = _script(where, ROLLOUT_TRAININGS.format(cases=json.dumps(cases)))
    return {case: (status[case], where / case) for case in cases}


@pytest.mark.slow
@pytest.mark.xdist_group("vllm-rollouts")
@pytest.mark.parametrize("case", list(ROLLOUT_CASES))
def test_methods_train_with_rollouts_on_vllm(vllm_rollout_trainings, case):
    """DistiLLM, MiniLLM and SWITCH with ``method.decoding.engine=vllm`` (GKD: the two-process test below); MiniLLM
    and SWITCH with the teacher on the server too (SKD's rank gate, in process and served: tests/test_drafted.py and
    the drafts test above)."""
    rc, out = vllm_rollout_trainings[case]
    assert rc == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.slow
def test_each_process_samples_its_share_on_its_own_vllm_engine(vllm_server, tmp_path):
    """GKD with every batch the student's greedy samples from vLLM, under ``switchkd launch`` (2 processes, DDP, batch
    2 each): each process holds its own engine with the student's current weights and samples its own micro-batches'
    prompts, so the final weights equal one process with batch 4 whose greedy samples come from switchkd's engine (a
    process sampling the other's prompts, or from stale weights, would train on other sequences).  The one-process
    reference runs here, without vLLM (greedy samples are the same on both engines: the drafts test above)."""
    from safetensors.torch import load_file

    _, teacher = vllm_server
    student = build(tmp_path / "student", layers=1, seed=1)
    common = ["tiny/gkd", f"model.name={student}", f"teacher.name={teacher}",
              "method.decoding.do_sample=false", "method.mixture.student_ratio=1", "data.train=synthetic",
              "data.synthetic_size=32", "data.max_length=96", "data.max_prompt_length=48", "method.max_new_tokens=12",
              "train.max_steps=3", "train.eval_every=0", "train.save_every=0", "train.loss_chunk=0", "data.dev=null",
              "train.log_every=1", "train.lr=1e-2"]
    assert main(["train", *common, "method.decoding.engine=switchkd", "train.batch_size=4",
                 f"output.dir={tmp_path / 'one'}"]) == 0
    records = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    port = free_port()
    two = subprocess.run([sys.executable, "-m", "switchkd", "launch", *common, "method.decoding.engine=vllm",
                          "train.batch_size=2",
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

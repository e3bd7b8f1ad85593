"""Sharded training on CPUs (gloo): FSDP2 equals one process; the rank-synchronised rollout equals
the unsharded one when ranks finish at different steps."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from inprocess import train_here
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # subprocesses / multi-process runs: make test runs them, make test-fast skips them

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")  # gloo on CPUs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, args: list, out: Path, launch: str) -> subprocess.CompletedProcess:
    """2 processes under ``configs/accelerate/<launch>.yaml``."""
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
           str(ROOT / f"configs/accelerate/{launch}.yaml"), "--num_processes=2", f"--main_process_port={_free_port()}",
           "-m", "switchkd", "train", config]
    return subprocess.run(cmd + args + [f"output.dir={out}"], env=ENV, capture_output=True, text=True, timeout=300)


# SWITCH: greedy (sampling draws differ between one batch of 4 and two of 2), a threshold that gives a
# teacher/student mixture on these random models, and dev evaluation with keep_best (collective generation)
SWITCH = ["method.decoding.do_sample=false", "method.switch.schedule=const", "method.switch.tau0=0.0087", "train.eval_every=2",
          "eval.limit=4", "eval.max_new_tokens=8"]


# the chunked LM head (2-process runs only): ranks with different response lengths run the same
# number of collective head calls; the 1-process run without chunks gives the reference weights
CHUNK = ["train.loss_chunk=5"]


@pytest.mark.parametrize("launch,preset,extra,chunk", [
    ("fsdp", "kd", ["data.dev=null"], CHUNK),
    ("fsdp", "switch", SWITCH, []),
    # one ZeRO-3 run (each costs a minute of the suite's two cores): gradient accumulation and a LoRA student merged
    # at the end (the chunked head with LoRA is refused under ZeRO-3: tests/test_launch.py)
    ("deepspeed_zero3", "switch", SWITCH + ["train.grad_accum=2", "model.lora.r=4", "output.merge=true"], []),
])
def test_sharded_two_processes_match_one(tmp_path, launch, preset, extra, chunk):
    """FSDP2 / DeepSpeed ZeRO-3 over 2 CPU processes (student and teacher sharded), batch 2 each ==
    1 process, batch 4; with the chunked LM head where ``chunk`` says so."""
    config = str(ROOT / f"configs/tiny/{preset}.yaml")
    common = ["train.max_steps=2", "data.synthetic_size=32", "train.log_every=1", "method.max_new_tokens=16"] + extra
    train_here([config, *common, "train.batch_size=4", f"output.dir={tmp_path / 'one'}"])  # 1 process: this one
    two = _launch(config, common + chunk + ["train.batch_size=2"], tmp_path / "two", launch)
    assert two.returncode == 0, two.stderr[-2000:]
    kind = "FSDP" if launch == "fsdp" else "DEEPSPEED"
    assert f"distributed: 2 processes, {kind}, student sharded, teacher sharded" in two.stdout
    assert "shm_comm" not in two.stdout + two.stderr  # DeepSpeed's CPU inference op is not built (distributed.py)
    files = ["model.safetensors"] + (["adapter/adapter_model.safetensors"] if "output.merge=true" in extra else [])
    for name in files:  # a LoRA student: the merged model and the adapter
        a, b = load_file(tmp_path / "one/final" / name), load_file(tmp_path / "two/final" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    if preset == "switch":
        import json

        last = [json.loads(line) for line in (tmp_path / "two/metrics.jsonl").read_text().splitlines()][-1]
        assert 0.05 < last["switch/teacher_frac"] < 0.95, last  # both models wrote tokens
        assert "dev_rougeL" in last and (tmp_path / "two/best").is_dir()


def _synced_worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch.distributed.fsdp import fully_shard

        from switchkd.distributed import is_sharded
        from switchkd.models import build_tiny, tiny_tokenizer
        from switchkd.rollout import Gate, RolloutConfig, rollout

        tok = tiny_tokenizer()
        student = build_tiny("tiny:gpt2,layers=2,dim=32,heads=2,seed=3", tok).eval()
        teacher = build_tiny("tiny:llama,layers=2,dim=32,heads=4,seed=4", tok).eval()
        torch.manual_seed(rank)
        ids = torch.randint(3, 200, (2, 5 + rank))
        mask = torch.ones_like(ids)
        # rank 0 decodes 4 tokens, rank 1 up to 12 with an EOS that ends one row early: the ranks' loops
        # end at different steps, so rank 0 must keep stepping (discarded) until rank 1 is done
        base = RolloutConfig(do_sample=True, seed=5, vocab_size=len(tok),
                             pad_token_id=0, eos_token_id=1, speculative=False, compile=False,
                             max_new_tokens=4 if rank == 0 else 12)
        probe = rollout(student, teacher, ids, mask, base, Gate(tau0=0.01, decay=0.05))  # the gate's median: a mixture
        gate = Gate(tau0=float(probe.gate[probe.response_mask].median()), decay=0.05, schedule="const")
        ref = rollout(student, teacher, ids, mask, base, gate)
        if rank == 1:  # an EOS that row 0 writes at some step j >= 2 and row 1 not by then
            r0, r1 = (ref.sequences[i, ids.shape[1]:].tolist() for i in (0, 1))
            j = next(j for j in range(2, 10) if r0[j] not in r0[:j] and r0[j] not in r1[:j + 1])
            base.eos_token_id = r0[j]
            ref = rollout(student, teacher, ids, mask, base, gate)
        for m in (student, teacher):
            for block in m.modules():
                if type(block).__name__ in m._no_split_modules:
                    fully_shard(block)
            fully_shard(m)
        assert is_sharded(student) and is_sharded(teacher)
        out = rollout(student, teacher, ids, mask, base, gate)
        results[rank] = {k: (getattr(ref, k).tolist(), getattr(out, k).tolist())
                         for k in ("sequences", "response_mask", "from_teacher")}
    finally:
        dist.destroy_process_group()


def test_synced_rollout_matches_unsharded():
    """FSDP2-sharded student and teacher, ranks with different lengths and an EOS mid-batch: each
    rank's SWITCH rollout equals the unsharded rollout token for token."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_synced_worker, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        for key, (ref, got) in results[rank].items():
            assert ref == got, (rank, key)
    mask1 = results[1]["response_mask"][0]
    assert 3 <= sum(mask1[0]) < sum(mask1[1])  # rank 1: row 0 ended at its EOS, row 1 went on
    assert sum(results[0]["response_mask"][0][0]) == 4
    by_teacher = [x for r in (0, 1) for row in results[r]["from_teacher"][0] for x in row]
    assert any(by_teacher) and not all(by_teacher)  # both models wrote tokens


@pytest.mark.parametrize("preset", ["gkd", "distillm", "switch"])
def test_per_batch_choices_agree_across_processes(preset):
    """Whether a batch is rolled out is drawn alike on every process (sharded rollouts are collective),
    while row-level sampling seeds differ per process."""
    from switchkd.config import load_config
    from switchkd.methods import make_source

    cfg = load_config(str(ROOT / f"configs/tiny/{preset}.yaml"), ["method.mixture.student_ratio=0.5", "method.switch.ratio=0.5"])
    a, b = (make_source(cfg, None, None, None, 0, seed=cfg.train.seed * 1000 + rank) for rank in (0, 1))
    assert [a.shared.random() for _ in range(20)] == [b.shared.random() for _ in range(20)]
    assert a.rng.random() != b.rng.random()
    state = a.state_dict()
    c = make_source(cfg, None, None, None, 0, seed=7)
    c.load_state_dict(state)
    assert c.shared.random() == a.shared.random()

"""``switchkd launch``: accelerate launch with the run checked first; a user error is one line from rank 0
with exit status 2 (the launcher's own failure report withheld); a good run trains on two processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from switchkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
KD = str(ROOT / "configs/tiny/kd.yaml")
DDP = str(ROOT / "configs/accelerate/ddp.yaml")
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
SMALL = ["data.synthetic_size=32", "data.dev=null", "train.max_steps=2", "train.batch_size=2",
         "model.name=tiny:gpt2,layers=1,dim=32,heads=2", "teacher.name=tiny:gpt2,layers=1,dim=32,heads=2,seed=1"]


def _port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_mistakes_every_process_would_meet_are_refused_before_starting(capsys, tmp_path):
    fsdp1 = tmp_path / "fsdp1.yaml"
    fsdp1.write_text((ROOT / "configs/accelerate/fsdp.yaml").read_text().replace("fsdp_version: 2", "fsdp_version: 1"))
    for argv, fragment in (([KD, "train.lr=-1", "--accelerate", DDP], "train.lr"),
                           ([KD, "--accelerate", str(tmp_path / "none.yaml")], "none.yaml: no such file"),
                           ([KD, f"output.dir={tmp_path / 'o'}", "--accelerate", str(fsdp1)], "fsdp_version 1"),
                           ([KD, "output.dir=/proc/switchkd-x", "--accelerate", DDP], "output.dir")):
        assert main(["launch", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("switchkd: error:") and fragment in err[0], err
    assert not (tmp_path / "o").exists()


def test_fsdp_version_1_is_a_config_error_before_accelerate_builds_it(monkeypatch):
    from switchkd.config import ConfigError, load_config
    from switchkd.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version 1 is not supported"):
        make_accelerator(load_config(KD), [])


def _sharded(monkeypatch, sharding: str):
    """An accelerator stand-in that ``distributed.check`` sees as ``sharding`` ("fsdp": FSDP2, or "zero3")."""
    from types import SimpleNamespace

    import switchkd.distributed as distributed

    monkeypatch.setattr(distributed, "kind", lambda acc: sharding)
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)))


@pytest.mark.parametrize("sharding", ["fsdp", "zero3"])
def test_vllm_rollouts_with_a_sharded_student_are_a_config_error(monkeypatch, sharding):
    """Each process's vLLM engine needs the whole student: FSDP2 and ZeRO-3 are refused in one line (DDP works:
    tests/test_vllm_engine.py)."""
    import switchkd.distributed as distributed
    from switchkd.config import ConfigError, load_config

    acc = _sharded(monkeypatch, sharding)
    with pytest.raises(ConfigError, match="method.decoding.engine=vllm: the student is sharded .*ddp.yaml"):
        distributed.check(acc, load_config(str(ROOT / "configs/tiny/gkd.yaml"), ["method.decoding.engine=vllm"]))
    distributed.check(acc, load_config(str(ROOT / "configs/tiny/gkd.yaml")))  # the built-in engine shards fine


def test_the_chunked_head_with_lora_under_zero3_is_a_config_error(monkeypatch):
    """Under ZeRO-3 the chunked head's recomputation finds a LoRA student's frozen head released: refused in one
    line (FSDP2 and the unchunked head train: tests/test_sharded.py)."""
    import switchkd.distributed as distributed
    from switchkd.config import ConfigError, load_config

    lora_chunk = load_config(str(ROOT / "configs/tiny/switch.yaml"), ["model.lora.r=4", "train.loss_chunk=5"])
    with pytest.raises(ConfigError, match="train.loss_chunk with a LoRA student .* ZeRO-3"):
        distributed.check(_sharded(monkeypatch, "zero3"), lora_chunk)
    distributed.check(_sharded(monkeypatch, "fsdp"), lora_chunk)


def test_a_cpu_deepspeed_launch_does_not_build_the_inference_op(monkeypatch):
    """DeepSpeed's torch backend builds its CPU inference all-reduce op through ``build_shm_op`` when the process
    group starts; a CPU DeepSpeed launch replaces that function (training never calls the op)."""
    import importlib
    import inspect

    deepspeed_torch = importlib.import_module("deepspeed.comm.torch")

    from switchkd.distributed import skip_cpu_inference_op

    assert "self.shm_comm_op = build_shm_op()" in inspect.getsource(deepspeed_torch.TorchBackend.__init__)
    monkeypatch.setattr(deepspeed_torch, "build_shm_op", deepspeed_torch.build_shm_op)  # restored afterwards
    skip_cpu_inference_op()
    assert deepspeed_torch.build_shm_op() is None


@pytest.mark.slow
def test_an_error_inside_the_processes_is_one_line_from_rank_0_with_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("garbage\n")
    r = subprocess.run([sys.executable, "-m", "switchkd", "launch", KD, *SMALL, f"data.train={bad}",
                        f"output.dir={tmp_path / 'o'}", "--accelerate", DDP, "--num-processes", "2",
                        f"--launch-arg=--main_process_port={_port()}"], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [x for x in r.stderr.splitlines() if "error" in x.lower() or "Traceback" in x]
    assert errors == [f"switchkd: error: {bad}:1: invalid JSON line (Expecting value)"], r.stderr[-2000:]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_good_run_on_two_processes_equals_one(tmp_path):
    """DDP on 2 CPU processes (gloo) with batch 2 each ends with the weights of 1 process with batch 4."""
    import torch
    from inprocess import train_here
    from safetensors.torch import load_file

    steps = ["train.max_steps=3", "train.log_every=1"]
    r = subprocess.run([sys.executable, "-m", "switchkd", "launch", KD, *SMALL, *steps, f"output.dir={tmp_path / 'two'}",
                        "--accelerate", DDP, "--num-processes", "2", f"--launch-arg=--main_process_port={_port()}"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "distributed: 2 processes" in r.stdout
    train_here([KD, *SMALL, *steps, "train.batch_size=4", f"output.dir={tmp_path / 'one'}"])
    a, b = load_file(tmp_path / "one/final/model.safetensors"), load_file(tmp_path / "two/final/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)

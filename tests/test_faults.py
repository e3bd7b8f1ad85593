"""Faults survived: kill -9 during training (checkpoint writes included), then train.resume=true, ends with
the weights of an uninterrupted run; corrupt checkpoints are skipped; a non-finite loss stops the run;
a finished run is not overwritten by accident."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from inprocess import train_here
from safetensors.torch import load_file

from switchkd.cli import main

pytestmark = pytest.mark.slow  # subprocesses / multi-process runs: make test runs them, make test-fast skips them

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.synthetic_size=48", "train.max_steps=6", "train.save_every=2", "train.batch_size=4", "train.log_every=1",
         "method.distillm.dev_limit=8",
         "train.eval_every=0", "eval.limit=4", "train.keep_best=false", "method.max_new_tokens=24",
         "model.name=tiny:gpt2,layers=1,dim=32,heads=2", "teacher.name=tiny:gpt2,layers=2,dim=32,heads=2,seed=1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")


def _cmd(preset: str, out: Path, extra=()):
    return [sys.executable, "-m", "switchkd", "train", preset, *SMALL, *extra, f"output.dir={out}"]


def _steps(out: Path) -> list:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(x)["step"] for x in lines if x.endswith("}")]


# (DistiLLM at p 0.5 with grad_accum 2 covers dataset batches, student batches, the replay buffer and
# accumulation; a separate KD case added 35 s to the suite and nothing these two do not check)
@pytest.mark.parametrize("preset,extra", [("tiny/switch", ()),
                                          ("tiny/distillm", ("train.grad_accum=2", "method.distillm.init_student_prob=0.5")),
                                          # rollouts held across steps (PPO epochs) are checkpointed with the run
                                          ("tiny/minillm", ("train.grad_accum=2", "method.minillm.ppo_epochs=3"))])
def test_kill_9_and_resume_gives_the_uninterrupted_weights(preset, extra, tmp_path):
    train_here([preset, *SMALL, *extra, f"output.dir={tmp_path / 'full'}"])  # the uninterrupted run, in this process
    out = tmp_path / "killed"
    for kill_after in (2, 4):  # two kills at different moments (mid-step or mid-checkpoint, whatever comes)
        proc = subprocess.Popen(_cmd(preset, out, (*extra, "train.resume=true")), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and (max(_steps(out), default=0) < kill_after):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    train_here([preset, *SMALL, *extra, "train.resume=true", f"output.dir={out}"])  # resumed in this process
    a, b = load_file(tmp_path / "full/final/model.safetensors"), load_file(out / "final/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert _steps(out) == list(range(1, 7))  # each step once


def test_corrupt_checkpoint_is_skipped_and_nan_stops_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    kd = str(ROOT / "configs/tiny/kd.yaml")
    common = [*SMALL[:-2], "model.name=tiny:gpt2,layers=1,dim=32,heads=2", "teacher.name=tiny:gpt2,layers=2,dim=32,heads=2,seed=1",
              "train.max_steps=6", f"output.dir={out}"]
    assert main(["train", kd, *common]) == 0
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-00000004", "step-00000006"][: len(ckpts)] or len(ckpts) == 2
    (ckpts[-1] / "model.safetensors").write_bytes(b"garbage")
    assert main(["train", kd, *common, "train.resume=true"]) == 0
    captured = capsys.readouterr().out
    assert "skipping unreadable checkpoint" in captured and f"resumed from {ckpts[-2]}" in captured
    ckpts = sorted((out / "checkpoints").iterdir())
    rng = next(ckpts[-1].glob("random_states_*.pkl"))
    rng.write_bytes(rng.read_bytes()[:10])  # a truncated RNG file is not silently accepted
    assert main(["train", kd, *common, "train.resume=true"]) == 0
    captured = capsys.readouterr().out
    assert "skipping unreadable checkpoint" in captured and f"resumed from {ckpts[-2]}" in captured
    # a finished run is not overwritten by accident
    assert main(["train", kd, *common]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # a diverging run stops with one line, exit 1, and no final model
    nan = tmp_path / "nan"
    assert main(["train", kd, *common[:-1], f"output.dir={nan}", "train.lr=1e6", "train.clip=0"]) == 1
    err = [x for x in capsys.readouterr().err.strip().splitlines() if "error" in x or "Traceback" in x]
    assert len(err) == 1 and "is not finite" in err[0] and err[0].startswith("switchkd: error: step "), err
    assert not (nan / "final").exists()


class _Exploit:
    """A pickle that would create a marker file when unpickled with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_checkpoint_files_cannot_run_code(tmp_path, capsys):
    """Checkpoints are shared between people and machines: resuming never unpickles arbitrary objects."""
    import shutil

    import torch

    out = tmp_path / "run"
    kd = str(ROOT / "configs/tiny/kd.yaml")
    common = [*SMALL[:-2], "model.name=tiny:gpt2,layers=1,dim=32,heads=2", "teacher.name=tiny:gpt2,layers=2,dim=32,heads=2,seed=1",
              "train.max_steps=6"]
    assert main(["train", kd, *common, f"output.dir={out}"]) == 0
    for target in ("source_state.pt", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
        run = tmp_path / target
        shutil.copytree(out, run)
        shutil.rmtree(run / "final")
        ckpts = sorted((run / "checkpoints").iterdir())
        marker = tmp_path / f"pwned-{target}"
        torch.save({"x": _Exploit(marker)}, ckpts[-1] / target)
        capsys.readouterr()
        assert main(["train", kd, *common, f"output.dir={run}", "train.resume=true"]) == 0
        captured = capsys.readouterr().out
        assert not marker.exists(), target
        # refused as unreadable (accelerate also refuses a custom-object file no object is registered for)
        assert "skipping unreadable checkpoint" in captured and f"resumed from {ckpts[-2]}" in captured, target


def test_two_runs_into_one_output_dir(tmp_path, capsys):
    """The second of two runs started into one output.dir refuses in one line and touches nothing, even with
    output.overwrite=true; the lock a kill -9 leaves behind does not block the next run."""
    out = tmp_path / "run"
    first = subprocess.Popen(_cmd("tiny/kd", out, ["train.max_steps=100000", "train.save_every=0"]),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (out / ".switchkd.lock").read_text() == str(first.pid)
        capsys.readouterr()
        rc = main(["train", "tiny/kd", *SMALL, f"output.dir={out}", "output.overwrite=true"])  # in this process
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and f"another switchkd run (process {first.pid})" in err[0], err
        assert first.poll() is None and (out / "config.yaml").is_file()  # the first run was left alone
    finally:
        first.kill()
        first.wait()
    assert (out / ".switchkd.lock").read_text() == str(first.pid)  # left by the killed run
    train_here(["tiny/kd", *SMALL, "output.overwrite=true", "train.max_steps=2", f"output.dir={out}"])
    assert _steps(out) == [1, 2] and not (out / ".switchkd.lock").exists()


def test_ctrl_c_leaves_a_resumable_run_and_a_clean_last_line(tmp_path):
    """SIGINT mid-run: exit 130, the last line says how to continue, no traceback; resuming finishes with
    the weights of an uninterrupted run."""
    preset = "tiny/kd"
    train_here([preset, *SMALL, f"output.dir={tmp_path / 'full'}"])  # the uninterrupted run, in this process
    out = tmp_path / "stopped"
    # a pytest-xdist worker ignores SIGINT, and an ignored signal stays ignored across exec (Python then installs no
    # KeyboardInterrupt handler): the run gets the default disposition back, as from a terminal
    proc = subprocess.Popen(_cmd(preset, out, ("train.resume=true",)), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and max(_steps(out), default=0) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip()]
    assert lines[-1] == "switchkd: interrupted; continue it with the same command and train.resume=true", lines[-3:]
    assert "Traceback" not in err
    assert not (out / ".switchkd.lock").exists()
    train_here([preset, *SMALL, "train.resume=true", f"output.dir={out}"])  # resumed in this process
    a, b = load_file(tmp_path / "full/final/model.safetensors"), load_file(out / "final/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)

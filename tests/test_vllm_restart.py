"""A teacher's vLLM server that dies mid-run: the run stops in one line with its last checkpoint intact, and
``train.resume=true`` against the server started again ends with an uninterrupted run's weights.  Against the
suite's real servers (``tests/conftest.py``): the spare one is killed (SIGKILL) and restarted on its port."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from switchkd.cli import main
from switchkd.served import ServedTeacher
from tests.vllm_models import build


def _kill_group(pid: int) -> None:
    """SIGKILL a server's process group (connections refused from then on, as from a crashed server)."""
    import signal
    import time

    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(600):
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _serve_again(teacher: Path, url: str, log: Path) -> int:
    """Start a server of ``teacher`` on ``url``'s port again; its process group id, once it answers."""
    import time
    import urllib.request

    from tests.vllm_models import server_command, server_env

    env = server_env()
    proc = subprocess.Popen(server_command(teacher, int(url.rsplit(":", 1)[1])), stdout=open(log, "ab"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if json.loads(r.read()).get("data"):
                    return proc.pid
        except OSError:
            time.sleep(0.5)
    _kill_group(proc.pid)
    pytest.fail(f"the restarted vLLM server did not start: {log.read_bytes()[-2000:].decode(errors='replace')}")


@pytest.mark.slow
def test_a_server_that_dies_mid_run_stops_it_in_one_line_and_resume_ends_as_an_uninterrupted_run(
        vllm_server, vllm_spare_server, tmp_path, capsys, monkeypatch):
    """KD with the teacher on the suite's spare real server (an identical copy of the teacher), killed (SIGKILL)
    after step 3 (checkpoint at step 2): one line, exit 2, the checkpoint intact; with the server started again on
    the same port, ``train.resume=true`` ends with the weights of an uninterrupted run against the suite's server."""
    from safetensors.torch import load_file

    url, teacher = vllm_server
    spare_url, spare_teacher, pid = vllm_spare_server
    student = build(tmp_path / "student", layers=1, seed=1)
    common = ["train", "tiny/kd", f"model.name={student}", f"teacher.name={teacher}", "data.train=synthetic",
              "data.synthetic_size=32", "data.max_length=96", "data.max_prompt_length=48", "train.max_steps=5",
              "train.batch_size=4", "train.lr=3e-3", "train.eval_every=0", "train.save_every=2", "train.loss_chunk=0",
              "data.dev=null", "teacher.retries=2"]
    assert main([*common, f"teacher.server={url}", f"output.dir={tmp_path / 'whole'}"]) == 0
    served, calls = ServedTeacher.targets, []

    def dies_before_step_4(self, batch, vocab):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) == 4:
            _kill_group(pid)
        return served(self, batch, vocab)

    monkeypatch.setattr(ServedTeacher, "targets", dies_before_step_4)
    rc = main([*common, f"teacher.server={spare_url}", f"output.dir={tmp_path / 'cut'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("switchkd: error: teacher.server=") and "train.resume=true" in err[-1], err
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-00000002"]
    assert not (tmp_path / "cut" / "final").exists()
    monkeypatch.setattr(ServedTeacher, "targets", served)
    again = _serve_again(spare_teacher, spare_url, tmp_path / "restarted.log")  # back on its port
    try:
        assert main([*common, f"teacher.server={spare_url}", f"output.dir={tmp_path / 'cut'}",
                     "train.resume=true"]) == 0
    finally:
        _kill_group(again)
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6

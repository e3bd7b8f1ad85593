"""Test session setup: offline Hugging Face, no network sockets, small shared fixtures."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

if os.environ.get("PYTEST_XDIST_WORKER"):  # several test processes (make test): the cores shared out among them
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
_real_connect = socket.socket.connect


def _guarded_connect(self: socket.socket, address):  # type: ignore[no-untyped-def]
    """Allow Unix sockets and loopback only; anything else is a test bug."""
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = host == "localhost"
        if not ok:
            raise RuntimeError(f"network access blocked in tests: {address}")
    return _real_connect(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]


def pytest_configure(config: pytest.Config) -> None:
    """Start the suite's one vLLM server (tests/vllm_models.py) in the background, in the controlling process, so that
    every test process shares it and its start-up overlaps the other tests; ``vllm_server`` waits for it."""
    import importlib.util
    import sys
    import tempfile

    if os.environ.get("PYTEST_XDIST_WORKER") or "SWITCHKD_TEST_VLLM" in os.environ:
        return
    if importlib.util.find_spec("vllm") is None or not (SHARED / "data" / "gpt2_tokenizer").is_dir():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    where = Path(tempfile.mkdtemp(prefix="switchkd-vllm-test-"))
    log = open(where / "server.log", "wb")  # noqa: SIM115  (the server's, closed at exit)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("vllm_models.py")), "serve",
                             str(where / "teacher"), str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    config._switchkd_vllm = (proc, where)  # type: ignore[attr-defined]
    os.environ["SWITCHKD_TEST_VLLM"] = f"http://127.0.0.1:{port}|{where / 'teacher'}|{where / 'server.log'}|{proc.pid}"


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    started = getattr(config, "_switchkd_vllm", None)
    if started is None:
        return
    proc, where = started
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="session")
def vllm_server() -> tuple:
    """``(url, teacher directory)`` of the suite's vLLM server, once it answers (skipped without vLLM)."""
    import json
    import time
    import urllib.request

    if "SWITCHKD_TEST_VLLM" not in os.environ:
        pytest.skip("vLLM is not installed (make test installs it) or ../shared is missing")
    url, teacher, log, pid = os.environ["SWITCHKD_TEST_VLLM"].split("|")
    deadline = time.time() + 400
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if json.loads(r.read()).get("data"):
                    return url, Path(teacher)
        except OSError:
            pass
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            break
        time.sleep(1.0)
    tail = Path(log).read_bytes()[-3000:].decode(errors="replace") if Path(log).is_file() else "(no log)"
    pytest.fail(f"the suite's vLLM server did not start; its log ends:\n{tail}")


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside the repository")
    return SHARED

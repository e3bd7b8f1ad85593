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
    """Start the suite's vLLM servers (tests/vllm_models.py) in the background, in the controlling process, so that
    every test process shares them and their start-up overlaps the other tests: the suite's server
    (``vllm_server``) and a spare one holding an identical copy of its teacher, which one test kills and restarts
    (``vllm_spare_server``)."""
    import importlib.util
    import tempfile

    if os.environ.get("PYTEST_XDIST_WORKER") or "SWITCHKD_TEST_VLLM" in os.environ:
        return
    if importlib.util.find_spec("vllm") is None or not (SHARED / "data" / "gpt2_tokenizer").is_dir():
        return
    where = Path(tempfile.mkdtemp(prefix="switchkd-vllm-test-"))
    started = []
    for variable, name in (("SWITCHKD_TEST_VLLM", "teacher"), ("SWITCHKD_TEST_VLLM_SPARE", "spare")):
        proc, spec = _start_server(where, name)
        started.append(proc)
        os.environ[variable] = spec
    config._switchkd_vllm = (started, where)  # type: ignore[attr-defined]


def _start_server(where: Path, name: str) -> tuple:
    """One server of a tiny teacher built into ``where/name`` (same seed: identical weights) on a free port;
    ``(process, "url|teacher|log|pid")``."""
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(where / f"{name}.log", "wb")  # noqa: SIM115  (the server's, closed at exit)
    from tests.vllm_models import server_env

    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("vllm_models.py")), "serve",
                             str(where / name), str(port)], stdout=log, stderr=subprocess.STDOUT, env=server_env(),
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}|{where / name}|{where / f'{name}.log'}|{proc.pid}"


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    started = getattr(config, "_switchkd_vllm", None)
    if started is None:
        return
    procs, where = started
    for proc in procs:
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


def _wait_for(variable: str) -> tuple:
    """``(url, teacher directory, pid)`` of a server started by :func:`pytest_configure`, once it answers."""
    import json
    import time
    import urllib.request

    if variable not in os.environ:
        pytest.skip("vLLM is not installed (make test installs it) or ../shared is missing")
    url, teacher, log, pid = os.environ[variable].split("|")
    deadline = time.time() + 400
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if json.loads(r.read()).get("data"):
                    return url, Path(teacher), int(pid)
        except OSError:
            pass
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            break
        time.sleep(1.0)
    tail = Path(log).read_bytes()[-3000:].decode(errors="replace") if Path(log).is_file() else "(no log)"
    pytest.fail(f"a vLLM server of the suite did not start; its log ends:\n{tail}")


DURATIONS = Path(__file__).with_name("durations.json")  # seconds of the slowest tests (make test-durations)


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: the blocks must match what xdist hands out
def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Under pytest-xdist (``make test``): deal the tests longest first into one consecutive block per worker, so
    that no long test starts last and the workers finish together.  ``--dist worksteal`` hands worker i the i-th
    consecutive slice of the collection (``remaining // workers left`` tests each) and an idle worker steals from
    the back of another's; each block here has exactly its slice's size.  Known durations come from
    ``tests/durations.json``; every other test counts as short and keeps its file's order.  Tests marked
    ``xdist_group(name)`` (sharing an expensive fixture) stay together in one block."""
    import json

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2 or not DURATIONS.is_file():
        return
    known = json.loads(DURATIONS.read_text())
    units: dict = {}  # a group's tests, or one test, dealt as one unit
    for item in items:
        mark = item.get_closest_marker("xdist_group")
        units.setdefault(mark.args[0] if mark else item.nodeid, []).append(item)
    cost = {key: sum(known.get(i.nodeid, 0.2) for i in unit) for key, unit in units.items()}
    room, left = [], len(items)
    for i in range(workers):  # xdist's split of the collection
        room.append(left // (workers - i))
        left -= room[-1]
    blocks: list = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for key in sorted(units, key=lambda k: -cost[k]):  # longest processing time first (stable: file order kept)
        fits = [w for w in range(workers) if room[w] >= len(units[key])] or list(range(workers))
        w = min(fits, key=lambda b: loads[b])
        blocks[w].extend(units[key])
        loads[w] += cost[key]
        room[w] -= len(units[key])
    items[:] = [item for block in blocks for item in block]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """``SWITCHKD_STORE_DURATIONS=1`` (``make test-durations``): note every test's seconds for the file above."""
    if os.environ.get("SWITCHKD_STORE_DURATIONS") and not os.environ.get("PYTEST_XDIST_WORKER"):
        _SEEN[report.nodeid] = _SEEN.get(report.nodeid, 0.0) + report.duration


_SEEN: dict = {}


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _SEEN and os.environ.get("SWITCHKD_STORE_DURATIONS") and not os.environ.get("PYTEST_XDIST_WORKER"):
        import json

        slow = {k: round(v, 1) for k, v in sorted(_SEEN.items(), key=lambda kv: -kv[1]) if v >= 1.0}
        DURATIONS.write_text(json.dumps(slow, indent=0) + "\n")


@pytest.fixture(scope="session")
def vllm_server() -> tuple:
    """``(url, teacher directory)`` of the suite's vLLM server, once it answers (skipped without vLLM)."""
    url, teacher, _ = _wait_for("SWITCHKD_TEST_VLLM")
    return url, teacher


@pytest.fixture(scope="session")
def vllm_spare_server() -> tuple:
    """``(url, teacher directory, process group id)`` of the spare server (the suite's teacher, an identical copy),
    for the one test that kills it and starts it again."""
    return _wait_for("SWITCHKD_TEST_VLLM_SPARE")


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside the repository")
    return SHARED

"""``switchkd launch``: ``accelerate launch ... -m switchkd train`` with the config checked first.

accelerate's launcher reports any failed process with its own multi-line ``ChildFailedError`` traceback
and exit status 1.  This command checks the run before starting processes (config, accelerate file,
output directory, teacher cache: the mistakes every process would meet), so those end in one line and
exit 2 with nothing started; a user error that only a process can see (a data file's content, a model's
files) is printed once by rank 0, the launcher's report is withheld, and the exit status is 2.  Anything
else (a crash, a killed process) passes through unchanged.  The processes themselves are accelerate's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import List, Optional, Sequence

from switchkd.config import ConfigError, load_config


def check_accelerate_file(path: str) -> dict:
    """The accelerate config at ``path``: a YAML mapping, FSDP only as FSDP2; one-line errors otherwise."""
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--accelerate {path}: no such file (the shipped ones: configs/accelerate/*.yaml)")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(p))
    except Exception as exc:
        raise ConfigError(f"--accelerate {path}: invalid YAML ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--accelerate {path}: expected a mapping of accelerate settings")
    fsdp = raw.get("fsdp_config") or {}
    if raw.get("distributed_type") == "FSDP" and str(fsdp.get("fsdp_version", 1)) != "2":
        raise ConfigError(f"--accelerate {path}: fsdp_version {fsdp.get('fsdp_version', 1)} is not supported; set "
                          "fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
    return raw


def preflight(config: str, overrides: Sequence[str], accelerate_file: str) -> None:
    """Everything a process would refuse, checked here: the config, the accelerate file, the output
    directory, a teacher cache's files."""
    from switchkd.rundir import check_output_dir

    cfg = load_config(config, overrides)
    check_accelerate_file(accelerate_file)
    check_output_dir(cfg)
    if cfg.method.teacher_cache:
        from switchkd.teacher_cache import read_meta

        read_meta(cfg.method.teacher_cache, cfg)


def command(config: str, overrides: Sequence[str], accelerate_file: str, num_processes: Optional[int],
            launch_args: Sequence[str]) -> List[str]:
    """The ``accelerate launch`` command line."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_file]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    return cmd + list(launch_args) + ["-m", "switchkd", "train", config, *overrides]


def launch(config: str, overrides: Sequence[str], accelerate_file: str, num_processes: Optional[int] = None,
           launch_args: Sequence[str] = ()) -> int:
    """Check, then run the processes; returns the exit status (2 after a user error)."""
    preflight(config, overrides, accelerate_file)
    with tempfile.TemporaryDirectory(prefix="switchkd-launch-") as tmp:
        error_file = Path(tmp) / "error"
        env = dict(os.environ, SWITCHKD_ERROR_FILE=str(error_file))
        proc = subprocess.Popen(command(config, overrides, accelerate_file, num_processes, launch_args), env=env,
                                stderr=subprocess.PIPE)
        relay = threading.Thread(target=_relay, args=(proc.stderr, error_file), daemon=True)
        relay.start()
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.wait()
            raise
        relay.join(timeout=5)
        return 2 if error_file.is_file() else rc


def _relay(stream, error_file: Path) -> None:  # type: ignore[no-untyped-def]
    """Copy the processes' stderr through (progress bars included) until a process reported a user error;
    what follows (the launcher's failure report) is withheld."""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    while True:
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            return
        if error_file.is_file():
            text = chunk.decode("utf-8", "replace")
            line = next((x for x in text.splitlines() if x.startswith("switchkd: error:")), None)
            if line is not None:  # the rank-0 line itself may share this chunk with the report
                print(line, file=sys.stderr, flush=True)
            for _ in iter(lambda: os.read(stream.fileno(), 65536), b""):  # drain it
                pass
            return
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            sys.stderr.write(chunk.decode("utf-8", "replace"))

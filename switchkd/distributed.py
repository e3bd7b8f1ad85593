"""Sharded training through accelerate: FSDP2 and DeepSpeed ZeRO-3 (DDP needs nothing here).

The student is prepared by ``accelerator.prepare`` like any model.  The frozen teacher is sharded
the way TRL shards its reference/teacher models: ``fully_shard`` under FSDP2 (TRL's
``prepare_fsdp``), a DeepSpeed inference engine under ZeRO-3 (TRL's ``prepare_deepspeed``), placed on
the device otherwise.  A sharded model all-gathers its weights inside every forward, so every rank
must run the same number of forwards: the rollout engine detects a sharded model
(:func:`is_sharded`) and decodes *rank-synchronised* (a rank whose rows are done keeps stepping,
its tokens discarded, until all ranks are done; see :func:`all_ranks`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from switchkd.sections import ConfigError

if TYPE_CHECKING:
    from switchkd.config import Config


def make_accelerator(cfg: Config, trackers: List[str]) -> Accelerator:
    """The run's Accelerator: a fresh accelerate state for a single process (an earlier run in this
    process may have used another device), gloo on CPU-only hosts, the launch config's FSDP/DeepSpeed
    kept on CPUs; unsupported sharded settings refused (:func:`check`)."""
    import os

    from accelerate.state import AcceleratorState

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(f"FSDP: fsdp_version {os.environ.get('FSDP_VERSION', '1')} is not supported; set fsdp_version: 2 "
                          "in the accelerate config (configs/accelerate/fsdp.yaml)")  # before accelerate fails on it
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    cpu_deepspeed_backend()
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=trackers or None,
                      project_dir=cfg.output.dir, cpu=not (_has_accelerator() or deepspeed_launch()))
    enable_cpu_fsdp(acc)
    check(acc, cfg)
    return acc


def _has_accelerator() -> bool:
    """True when a GPU-like device exists (on CPU-only hosts accelerate needs ``cpu=True`` for gloo DDP)."""
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
        torch.backends.mps.is_available()


def kind(acc: Accelerator) -> str:
    """``"fsdp"``, ``"zero3"``, or ``"replicated"`` (one process, DDP, ZeRO-1/2)."""
    if acc.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3:
        return "zero3"
    return "replicated"


def check(acc: Accelerator, cfg: Config) -> None:
    """Refuse what sharded training does not support, with one line naming the setting."""
    k = kind(acc)
    if k == "replicated":
        return
    if k == "fsdp" and acc.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError("FSDP: fsdp_version 1 is not supported; set fsdp_version: 2 in the accelerate config "
                          "(configs/accelerate/fsdp.yaml)")
    if cfg.method.decoding.engine == "vllm":  # each process's engine needs the whole student, not its shard
        raise ConfigError(f"method.decoding.engine=vllm: the student is sharded ({'FSDP2' if k == 'fsdp' else 'ZeRO-3'}) "
                          "and every process's vLLM engine needs all of its weights; launch with DDP "
                          "(configs/accelerate/ddp.yaml) or set method.decoding.engine=switchkd")
    if k == "zero3" and cfg.model.lora.r > 0 and cfg.train.loss_chunk > 0:  # recomputation meets a released shard
        raise ConfigError("train.loss_chunk with a LoRA student (model.lora.r > 0) under ZeRO-3 is not supported (the "
                          "chunked head's backward finds the frozen head's weights released); set train.loss_chunk=0 "
                          "or launch with FSDP2 (configs/accelerate/fsdp.yaml)")


def prepare_teacher(teacher: Optional[torch.nn.Module], acc: Accelerator) -> Optional[Any]:
    """The frozen teacher, sharded like the student under FSDP2/ZeRO-3, else moved to the device."""
    if teacher is None:
        return None
    k = kind(acc)
    if k == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        plugin = acc.state.fsdp_plugin
        for layer in _layers(teacher):  # one all-gather per block, as accelerate wraps the student
            fully_shard(layer, reshard_after_forward=plugin.reshard_after_forward,
                        mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy())
        # the root (embeddings, final norm, LM head) keeps its weights gathered after a forward, as
        # accelerate does for the student: the chunked loss applies the LM head after the forward
        fully_shard(teacher, mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy())
        return teacher.eval()
    if k == "zero3":
        return _deepspeed_inference(teacher, acc)
    return teacher.to(acc.device).eval()


def _layers(model: torch.nn.Module) -> list:
    """The model's repeated decoder blocks (``_no_split_modules`` classes), for per-block sharding."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def _deepspeed_inference(model: torch.nn.Module, acc: Accelerator) -> Any:
    """A ZeRO-3 engine without optimizer for a frozen model (TRL's ``prepare_deepspeed``)."""
    import deepspeed

    ds: Dict[str, Any] = copy.deepcopy(acc.state.deepspeed_plugin.deepspeed_config)
    hidden = getattr(model.config, "hidden_size", None)
    if hidden is not None:
        ds["zero_optimization"].update({"reduce_bucket_size": hidden * hidden,
                                        "stage3_param_persistence_threshold": 10 * hidden,
                                        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden)})
    for key in ("optimizer", "scheduler"):
        ds.pop(key, None)
    ds["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.eval()
    return engine


def is_sharded(model: Any) -> bool:
    """Whether ``model`` holds only a shard of its weights (FSDP2 module or DeepSpeed ZeRO-3 engine
    or module), so that its forwards are collective operations."""
    if model is None:
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule = ()  # type: ignore[misc,assignment]
    if isinstance(model, FSDPModule) or isinstance(getattr(model, "module", None), FSDPModule):
        return True
    p = next(iter(getattr(model, "module", model).parameters()), None)
    return p is not None and hasattr(p, "ds_id")


def all_ranks(flag: bool, device: torch.device) -> bool:
    """``flag`` and-reduced over all ranks (itself when not distributed)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def max_over_ranks(n: int, device: torch.device) -> int:
    """``n`` max-reduced over all ranks (itself when not distributed)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def unwrap(model: Any) -> Any:
    """The Hugging Face model inside a DeepSpeed engine (``.module``); other models unchanged
    (an FSDP2 module *is* the model)."""
    return model.module if type(model).__name__ == "DeepSpeedEngine" else model


def configure_deepspeed(acc: Accelerator, cfg: Config) -> None:
    """Fill the DeepSpeed config from the run's: micro-batch size, accumulation (the trainer's
    ``grad_accum`` micro-batches make one engine step) and gradient clipping (done by the engine)."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_batch_size"] = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
    ds["gradient_clipping"] = cfg.train.clip if cfg.train.clip > 0 else 0.0


def enable_cpu_fsdp(acc: Accelerator) -> None:
    """Honour an FSDP launch config on a CPU-only machine (gloo).

    accelerate turns a multi-process CPU launch into plain ``MULTI_CPU`` data parallelism whatever
    the config says, so an FSDP run on CPUs would silently train replicated.  torch's FSDP2 works
    over gloo, so this sets the accelerate state to FSDP with the plugin the launcher described
    (the 2-process CPU tests use it; GPU launches never need it)."""
    import os

    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    if acc.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        # AcceleratorState() re-reads PartialState's shared fields, so both are set
        PartialState._shared_state["distributed_type"] = acc.state.distributed_type = DistributedType.FSDP


def retie(model: torch.nn.Module, state: Dict[str, Any]) -> Dict[str, Any]:
    """A gathered state dict holds separate copies of tied weights (e.g. embeddings and LM head);
    point the aliases at one tensor again, so that ``save_pretrained`` stores it once."""
    first: Dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and name in state and first[id(p)] in state:
            state[name] = state[first[id(p)]]
        first.setdefault(id(p), name)
    return state


def deepspeed_launch() -> bool:
    """Whether ``accelerate launch`` asked for DeepSpeed (then accelerate must not be told ``cpu=True``,
    which would turn the run into plain CPU data parallelism; DeepSpeed picks its own accelerator)."""
    import os

    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def cpu_deepspeed_backend() -> None:
    """On a CPU-only machine, a DeepSpeed launch needs accelerate's process state created with the
    gloo backend (accelerate finds no device backend there and would run one process alone).

    DeepSpeed's CPU communication backend also compiles its shared-memory all-reduce op
    (``deepspeed_shm_comm``, two C++ files: one to two minutes in a fresh environment) when the process group
    starts; only ``inference_all_reduce`` (DeepSpeed's inference engines' tensor parallelism) calls it, never
    training's collectives, so the launch skips that build (``deepspeed.comm.torch.build_shm_op``)."""
    from accelerate.state import PartialState

    if deepspeed_launch() and not torch.cuda.is_available() and not PartialState._shared_state:
        skip_cpu_inference_op()
        PartialState(backend="gloo")


def skip_cpu_inference_op() -> None:
    """Tell DeepSpeed's torch backend not to build its CPU inference all-reduce op (``TorchBackend`` then keeps
    ``shm_comm_op = None`` and every collective goes through ``torch.distributed``, as it does for training)."""
    import importlib

    # the module itself (the attribute ``deepspeed.comm.torch`` is the torch package, imported over it)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def describe(acc: Accelerator, student_sharded: bool, teacher: Optional[Any]) -> str:
    """One line on how the run is distributed (printed by the main process)."""
    t = "no teacher" if teacher is None else f"teacher {'sharded' if is_sharded(teacher) else 'replicated'}"
    return (f"distributed: {acc.num_processes} processes, {acc.distributed_type.value}, student "
            f"{'sharded' if student_sharded else 'replicated'}, {t}")

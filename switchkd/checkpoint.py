"""A training run's checkpoints and saved models (the :class:`switchkd.train.Trainer`'s state on disk).

A checkpoint (``<output.dir>/checkpoints/step-N/``) holds accelerate's state (model, optimizer, RNG per
process, FSDP shards), the scheduler as JSON, the trainer's step and data position, the run's shape and
the sequence source's state; it is written into a ``.tmp`` directory renamed when complete, and the newest
two are kept.  ``resume`` continues from the newest readable one (a corrupt one is skipped with a warning).
Saved models (``best/``, ``final/``) are ``save_pretrained`` directories, written the same atomic way.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch
from accelerate.utils import load as safe_load

from switchkd import distributed
from switchkd.model_card import write_card
from switchkd.models import load_model, with_adapter
from switchkd.rundir import truncate_metrics
from switchkd.sections import ConfigError, LoraConfig

if TYPE_CHECKING:
    from switchkd.train import Trainer


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches consumed in ``epoch`` (per process)
    best: Optional[float] = None
    best_step: int = -1


def save_model(trainer: "Trainer", path: Path) -> None:
    """``save_pretrained`` (safetensors) into a temporary directory, then rename.  A LoRA student
    saves its adapter (``path/``; with ``output.merge``: ``path/adapter/`` and the merged model in ``path/``).
    Called by the main process, or by every process when the student is sharded (the full state
    dict is gathered collectively; the main process writes)."""
    state = trainer.acc.get_state_dict(trainer.student) if trainer.sharded else None
    if not trainer.acc.is_main_process:
        return
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = distributed.unwrap(trainer.acc.unwrap_model(trainer.student))
    if state is not None:
        state = distributed.retie(model, state)
    if hasattr(model, "merge_and_unload") and trainer.cfg.output.merge:
        model.save_pretrained(tmp / "adapter", safe_serialization=True, state_dict=state)
        trainer.tok.save_pretrained(tmp / "adapter")
        merged = with_adapter(load_model(replace(trainer.cfg.model, lora=LoraConfig()), trainer.tok), str(tmp / "adapter")) \
            if trainer.sharded else copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
    else:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
    trainer.tok.save_pretrained(tmp)
    write_card(tmp, trainer.cfg, trainer.source.settings, trainer.state.step, trainer.out / "metrics.jsonl")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def write(trainer: "Trainer") -> None:
    """Model, optimizer, scheduler, RNG, step, data position and the run's shape, written atomically
    (a ``.tmp`` directory renamed when complete); the newest two are kept."""
    root = trainer.out / "checkpoints"
    tmp = root / f"step-{trainer.state.step:08d}.tmp"
    trainer.acc.save_state(str(tmp))
    trainer.acc.wait_for_everyone()  # every process's files (RNG states, FSDP shards) are written before the rename
    if trainer.acc.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(trainer.state) | {"shape": shape(trainer), "lm": (
            trainer.lm.state_dict() if trainer.lm else None)}))
        (tmp / "scheduler.json").write_text(json.dumps(trainer.sched.state_dict()))
        torch.save(trainer.source.state_dict(), tmp / "source_state.pt")
        final = tmp.with_suffix("")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp"))[:-2]:
            shutil.rmtree(old)
    trainer.acc.wait_for_everyone()


def shape(trainer: "Trainer") -> Dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint."""
    t = trainer.cfg.train
    return {"batch_size": t.batch_size, "grad_accum": t.grad_accum, "processes": trainer.acc.num_processes,
            "model": trainer.cfg.model.name, "method.source": trainer.cfg.method.source}


def resume(trainer: "Trainer") -> None:
    """Continue from the newest readable checkpoint (a corrupt one is skipped with a warning);
    ``metrics.jsonl`` keeps only the steps up to it."""
    found = sorted(p for p in (trainer.out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    for ckpt in reversed(found):
        try:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            written, lm_state = state.pop("shape", None), state.pop("lm", None)
            # nothing in a checkpoint is unpickled beyond tensors, containers and numbers (no code runs)
            source_state = torch.load(ckpt / "source_state.pt", weights_only=True)
            sched_state = json.loads((ckpt / "scheduler.json").read_text())
            for rng_file in ckpt.glob("random_states_*.pkl"):  # accelerate would skip a bad one silently
                safe_load(rng_file)  # accelerate's own loader: weights_only with numpy's RNG types allowed
            if not any(ckpt.glob("random_states_*.pkl")):
                raise FileNotFoundError("no random_states_*.pkl")
            if written is not None and written != shape(trainer):
                raise ConfigError(f"train.resume: {ckpt} was written by a run with {written}; this run has "
                                  f"{shape(trainer)}")
            resumed = TrainState(**state)
            trainer.acc.load_state(str(ckpt))
            trainer.sched.load_state_dict(sched_state)
        except ConfigError:
            raise
        except Exception as exc:  # truncated or garbage files: fall back to the previous checkpoint
            print(f"switchkd: warning: skipping unreadable checkpoint {ckpt} ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''})", flush=True)
            continue
        trainer.state = resumed
        trainer.source.load_state_dict(source_state)
        if trainer.lm is not None and lm_state is not None:
            trainer.lm.load_state_dict(lm_state)
        if trainer.acc.is_main_process:
            truncate_metrics(trainer.out, trainer.state.step)
            print(f"resumed from {ckpt} at step {trainer.state.step}")
        return
    if trainer.acc.is_main_process:
        truncate_metrics(trainer.out, 0)  # the steps logged before the kill are trained again
        print(f"train.resume: no readable checkpoint in {trainer.out / 'checkpoints'}; starting from scratch")

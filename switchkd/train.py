"""The one training loop (on accelerate: ``accelerate launch`` gives DDP/FSDP/DeepSpeed).

Each optimizer step takes ``grad_accum`` micro-batches, lets the sequence source
rewrite them, counts response tokens over the whole step and all processes, and
back-propagates ``sum of token losses / that count`` so the gradient does not
depend on how the step is split.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from switchkd import checkpoint, distributed
from switchkd.batch import Batch
from switchkd.checkpoint import TrainState  # noqa: F401  (re-exported: where training stands)
from switchkd.config import Config, ConfigError, to_yaml
from switchkd.data import Tokenized, collate, load_examples, tokenize
from switchkd.evaluate import generate_texts, rouge_l
from switchkd.lmdata import LMStream, lm_loss, read_texts
from switchkd.losses import (
    kd_weight,
    micro_batch_loss,
    prompt_mask,
    response_logits,
    response_tokens,
    teacher_targets,
    token_loss,
)
from switchkd.methods import make_source
from switchkd.methods.base import Run
from switchkd.models import load_pair
from switchkd.rundir import acquire_lock, check_output_dir, release_lock
from switchkd.served import connect
from switchkd.teacher_cache import TeacherCache, read_meta


class _TiedWeights(logging.Filter):
    """Drop accelerate's "Removed shared tensor" notice at every checkpoint: tied embeddings are
    expected to be stored once, and they reload tied (the resume tests check the weights)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeights())


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or gradient); the message is one line."""


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norm weights (1-D parameters); empty groups (a LoRA
    student has no trainable 1-D parameters) are left out, as DeepSpeed would drop them."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def step_gradients(student: Any, teacher: Optional[Any], group: List[Batch], cfg: Config,
                   vocab: int, accelerator: Accelerator, lm: Optional[List[Dict[str, torch.Tensor]]] = None,
                   stats: Optional[Dict[str, float]] = None) -> tuple[float, int]:
    """Back-propagate one optimizer step's micro-batches; returns ``(mean token loss, tokens)``.

    Gradients equal those of ``sum over all tokens / total tokens`` across micro-batches and
    processes (DDP averages over processes, hence the ``num_processes`` factor).  With ``lm`` (one
    pre-training text batch per micro-batch) the objective gains ``method.lm_weight`` x the mean of
    the micro-batches' LM cross-entropies (averaged over processes); ``stats["lm_loss"]`` gets it.
    """
    local = sum(response_tokens(b.labels) for b in group)
    total = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="sum"))
    scale = accelerator.num_processes / max(total, 1)
    loss_sum, lm_sum = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    inst_w, inst_sum = cfg.method.instruction_weight, torch.zeros((), device=accelerator.device)
    if inst_w > 0:  # the instruction loss: a mean over the step's prompt positions, like the response mean
        n_prompt = sum(int(prompt_mask(b).sum()) for b in group)
        n_prompt = int(accelerator.reduce(torch.tensor(n_prompt, device=accelerator.device), reduction="sum"))
        inst_scale = accelerator.num_processes / max(n_prompt, 1)
    # DeepSpeed would divide by its gradient_accumulation_steps again: the scale above is already exact
    extra = {"scale_wrt_gas": False} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}
    for i, b in enumerate(group):
        sync = contextlib.nullcontext() if i == len(group) - 1 else accelerator.no_sync(student)
        with sync, accelerator.autocast():
            head = accelerator.unwrap_model(student).get_output_embeddings() if cfg.train.loss_chunk > 0 else None
            loss, inst = micro_batch_loss(student, teacher, b, cfg.method, vocab, cfg.train.loss_chunk, head)
            if inst is not None:
                inst_sum += inst.detach()
            if extra:  # DeepSpeed steps its engine at every backward that accelerate marks as a boundary
                accelerator.gradient_state._set_sync_gradients(i == len(group) - 1)
            objective = loss * scale + (inst_w * inst * inst_scale if inst_w > 0 else 0.0)
            if lm is not None:
                pt = lm_loss(student, lm[i])
                objective = objective + cfg.method.lm_weight * pt / len(group)
                lm_sum += pt.detach()
            accelerator.backward(objective, **extra)
        loss_sum += loss.detach()
    if inst_w > 0 and stats is not None:
        stats["instruction_loss"] = float(accelerator.reduce(inst_sum, reduction="sum")) / max(n_prompt, 1)
    if lm is not None and stats is not None:
        stats["lm_loss"] = float(accelerator.reduce(lm_sum, reduction="mean")) / len(group)
    return float(accelerator.reduce(loss_sum, reduction="sum")) / max(total, 1), total


class Trainer:
    """Holds the models, data and state of one run; :meth:`fit` runs it."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.out = cfg, Path(cfg.output.dir)
        if int(os.environ.get("RANK", "0")) == 0:
            check_output_dir(cfg)
        if cfg.method.teacher_cache:
            read_meta(cfg.method.teacher_cache, cfg)  # its files are checked before any model loads
        self.cache = TeacherCache(cfg.method.teacher_cache) if cfg.method.teacher_cache else None
        lm_texts = read_texts(cfg.method.lm_data) if cfg.method.lm_data else None  # its mistakes before the models load
        self.acc = distributed.make_accelerator(cfg, list(cfg.train.loggers))  # installed: checked with the config
        self.sharded = distributed.kind(self.acc) != "replicated"
        set_seed(cfg.train.seed)
        self.cross, self.teacher_tok = self._cross_view()
        served = cfg.teacher is not None and bool(cfg.teacher.server)
        self.student, self.teacher, self.tok, self.vocab = load_pair(
            cfg.model, None if cfg.method.teacher_cache or served else cfg.teacher, cross=self.cross is not None)
        if served:  # the teacher stays on its vLLM server: checked before the first optimizer step
            self.teacher = connect(cfg, self.tok)
        if self.cross is not None:  # the teacher reads at most its own positions
            c = self.teacher.config
            self.cross.max_length = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
        if cfg.train.gradient_checkpointing:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.cache is not None:
            self.cache.check_vocab(self.vocab)
        examples = load_examples(cfg.data.train, cfg.data, self.tok, cfg.data.limit)
        self.items, stats = self._tokenize(examples)
        if self.cache is not None:
            self.cache.check(self.items)
        self.dev = load_examples(cfg.data.dev, cfg.data, self.tok, cfg.eval.limit or 100) if cfg.data.dev else None
        self.dev_items = self._tokenize(self.dev)[0] if self.dev else []
        if cfg.train.batch_size * cfg.train.grad_accum * self.acc.num_processes > len(self.items):
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} (x grad_accum {cfg.train.grad_accum} x "
                              f"{self.acc.num_processes} processes) is larger than the {len(self.items)} training examples")
        per_epoch = math.ceil(math.ceil(len(self.items) / (cfg.train.batch_size * self.acc.num_processes)) / cfg.train.grad_accum)
        self.total = cfg.train.max_steps or per_epoch * cfg.train.epochs
        opt = torch.optim.AdamW(param_groups(self.student, cfg.train.weight_decay), lr=cfg.train.lr,
                                betas=tuple(cfg.train.betas))
        sched = get_scheduler(scheduler_name(cfg.train), opt, num_warmup_steps=cfg.train.warmup_steps,
                              num_training_steps=self.total)
        if distributed.kind(self.acc) == "zero3":
            distributed.configure_deepspeed(self.acc, cfg)
        # the scheduler is stepped once per optimizer step (a prepared one would step once per process)
        self.student, self.opt = self.acc.prepare(self.student, opt)
        self.sched = sched  # checkpointed as JSON by checkpoint.write (accelerate would pickle it)
        if not served:
            self.teacher_engine = distributed.prepare_teacher(self.teacher, self.acc)  # sharded like the student
            self.teacher = distributed.unwrap(self.teacher_engine)
        else:
            self.teacher_engine = None
        self.source = make_source(cfg, self.student, self.teacher, self.tok, self.vocab, self.acc.unwrap_model,
                                  seed=cfg.train.seed * 1000 + self.acc.process_index,
                                  run=Run(self.total, self.cross, self.sharded))
        self.source_dev = self.dev_items
        own = self.source.validation
        if own is not None and own.limit and cfg.data.dev:  # the source's own validation set
            self.source_dev = self._tokenize(load_examples(cfg.data.dev, cfg.data, self.tok, own.limit))[0]
        self.epoch_len = 0  # micro-batches per epoch on this process (known once the first epoch starts)
        self.lm = LMStream(cfg.method.lm_data, self.tok, cfg.data.max_length, cfg.train.seed, self.acc.process_index,
                           self.acc.num_processes, lm_texts) if cfg.method.lm_data else None
        self.state = TrainState()
        if self.acc.is_main_process:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"output.dir={self.out}: cannot create it ({exc.strerror or exc})") from None
            acquire_lock(self.out)  # a run started into the same directory meanwhile refuses from here on
            (self.out / "config.yaml").write_text(to_yaml(cfg))
            print(to_yaml(cfg), stats.line("train"), sep="\n", flush=True)
            if self.acc.num_processes > 1:
                print(distributed.describe(self.acc, self.sharded, self.teacher_engine), flush=True)
        if cfg.train.loggers:
            self.acc.init_trackers("switchkd", config=json.loads(json.dumps(asdict(cfg), default=str)))

    def _cross_view(self) -> tuple:
        """``(CrossView or None, teacher tokenizer or None)``: a teacher of another vocabulary reads every batch
        in its own tokens (:mod:`switchkd.cross`); refused in one line when the run cannot do that."""
        cfg = self.cfg
        if cfg.teacher is None or cfg.method.teacher_cache:
            return None, None
        from switchkd.cross import view_for
        from switchkd.methods import source_class
        from switchkd.models import load_tokenizer

        s_tok, t_tok = load_tokenizer(cfg.model), load_tokenizer(cfg.teacher)
        view = view_for(cfg, s_tok, t_tok, source_class(cfg.method.source).needs(cfg).across_vocabularies)
        if view is not None and cfg.teacher.server:
            raise ConfigError(f"teacher.server={cfg.teacher.server}: the teacher's vocabulary differs from the student's "
                              "(a served teacher's top-k ids are its own tokens); load the teacher in the process "
                              "(unset teacher.server) to distil across vocabularies")
        return view, (t_tok if view is not None else None)

    def _tokenize(self, examples: List[Any]) -> tuple:
        """``tokenize`` with the run's lengths and priming (and the teacher's own prompts across vocabularies)."""
        c = self.cfg
        return tokenize(examples, self.tok, c.data.max_prompt_length, c.data.max_length, c.method.priming,
                        self.teacher_tok)

    def _micro_batches(self) -> Iterator[Dict[str, torch.Tensor]]:
        """Micro-batches in a seeded per-epoch order, resuming at ``state.batch_in_epoch``."""
        while True:
            g = torch.Generator().manual_seed(self.cfg.train.seed * 1000 + self.state.epoch)
            order: List[Tokenized] = [self.items[i] for i in torch.randperm(len(self.items), generator=g)]
            dl = DataLoader(order, batch_size=self.cfg.train.batch_size, shuffle=False, generator=torch.Generator(),
                            collate_fn=lambda xs: collate(xs, self.tok.pad_token_id))  # no global-RNG draw
            dl = self.acc.prepare_data_loader(dl)
            self.epoch_len = len(dl)
            if self.state.batch_in_epoch:
                dl = self.acc.skip_first_batches(dl, self.state.batch_in_epoch)
            for batch in dl:
                self.state.batch_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def fit(self) -> Path:
        """Train to ``self.total`` optimizer steps; returns the final model directory."""
        cfg = self.cfg
        if cfg.train.resume:
            checkpoint.resume(self)
        own = self.source.validation
        if self.dev is not None and own is not None and own.reference and self.state.step == 0:
            self.source.on_validation(self._source_dev_loss())  # the reference evaluation before training
        batches = self._micro_batches()
        bar = tqdm(total=self.total, initial=self.state.step, desc="train", disable=not self.acc.is_main_process)
        try:
            while self.state.step < self.total:
                before = (self.state.epoch, self.state.batch_in_epoch)
                rec = self._step(batches)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.1e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                self._validate_and_log(rec, before)
                if cfg.train.save_every and self.state.step % cfg.train.save_every == 0 and self.state.step < self.total:
                    checkpoint.write(self)
        finally:  # the bar's last state ends its line before anything else is printed (Ctrl-C included)
            bar.close()
        return self._finish()

    def _step(self, batches: Iterator[Batch]) -> Dict[str, Any]:
        """One optimizer step: the source's micro-batches, the objective's gradients, the update; its log record."""
        cfg, t0 = self.cfg, time.perf_counter()
        group = [self._with_cache(b) for b in self.source.step_batches(batches, self.state.step, cfg.train.grad_accum)]
        sequences_s = time.perf_counter() - t0  # the step's sequences: rollouts, teacher samples (0 for dataset rows)
        self.student.train(self.source.dropout)
        lm = [self.lm.next(cfg.train.batch_size, self.acc.device) for _ in group] if self.lm else None
        extra: Dict[str, float] = {}
        loss, n_tok = step_gradients(self.student, self.teacher, group, cfg, self.vocab, self.acc, lm, extra)
        norm = self.acc.clip_grad_norm_(self.student.parameters(), cfg.train.clip if cfg.train.clip > 0 else float("inf"))
        norm = float(norm) if norm is not None else 0.0  # DeepSpeed clips inside its step (None before it)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.source.close()
            self.acc.end_training()
            raise TrainingError(f"step {self.state.step + 1}: {'loss' if not math.isfinite(loss) else 'gradient norm'}"
                                f" is not finite (loss {loss}, gradient norm {norm}); stopped without saving it: "
                                f"the last good checkpoint in {self.out / 'checkpoints'} is kept (lower train.lr?)")
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.state.step += 1
        tokens = sum(int(b.attention_mask.sum()) for b in group) * self.acc.num_processes
        step_s = time.perf_counter() - t0  # sequences (rollouts included) + losses + optimizer step
        return {"step": self.state.step, "epoch": self.state.epoch, "loss": loss, "lr": self.sched.get_last_lr()[0],
                "step_s": step_s, "sequences_s": sequences_s, "tokens_per_s": tokens / step_s,
                "response_tokens": n_tok} | extra

    def _validate_and_log(self, rec: Dict[str, Any], before: tuple) -> None:
        """The source's own validation (after an epoch), the dev evaluation (every ``train.eval_every`` steps
        and at the end), and the log line with the source's diagnostics."""
        cfg, last, own = self.cfg, self.state.step == self.total, self.source.validation
        if own is not None and own.when == "epoch" and self.dev is not None and self._epoch_ended(before):
            rec["dev_ce_epoch"] = self._source_dev_loss()
            self.source.on_validation(rec["dev_ce_epoch"])
        if self.dev is not None and ((cfg.train.eval_every and self.state.step % cfg.train.eval_every == 0) or last):
            rec["dev_loss"] = self._dev_loss()
            reads_ce = own is not None and own.metric == "cross_entropy"
            if reads_ce:
                rec["dev_ce"] = self._dev_loss(cross_entropy=True)
            if own is not None and own.when == "eval_every":
                self.source.on_validation(rec["dev_ce"] if reads_ce else rec["dev_loss"])
            if cfg.train.dev_rouge:
                rec["dev_rougeL"] = self._evaluate_dev()
        if self.state.step % max(cfg.train.log_every, 1) == 0 or last or "dev_loss" in rec or "dev_ce_epoch" in rec:
            self._log(rec | self.source.stats())
        if "dev_loss" in rec:  # logged first: best/'s model card lists this evaluation too
            self._keep_if_best(rec["dev_rougeL"] if cfg.train.dev_rouge else -rec["dev_loss"])
            self._announce(rec)

    def _with_cache(self, batch: Batch) -> Batch:
        """Attach the cached teacher targets (``teacher_selected``, a sparse ``TopK``) when a cache is in use, or
        the teacher's own tokens and their alignment when its vocabulary differs."""
        if self.cross is not None:
            batch = self.cross.apply(batch)
        if self.cache is not None:
            batch.teacher_selected = self.cache.targets(batch.index.tolist(), batch.response_lengths()).to(self.acc.device)
        return batch

    def _epoch_ended(self, before: tuple) -> bool:
        """Whether the micro-batches of the step just taken finished an epoch (``before``: the state's
        ``(epoch, batch_in_epoch)`` before the step; an epoch's last batch consumed counts as its end)."""
        if not self.epoch_len:
            return False
        done = lambda e, k: e * self.epoch_len + k  # noqa: E731  (micro-batches consumed)
        now = done(self.state.epoch, self.state.batch_in_epoch)
        return now // self.epoch_len > done(*before) // self.epoch_len

    def _source_dev_loss(self) -> float:
        """What the source's ``on_validation`` receives: its dev metric on its dev set, reduced its way."""
        own = self.source.validation
        return self._dev_loss(cross_entropy=own.metric == "cross_entropy", items=self.source_dev,
                              batch_mean=own.batch_mean)

    @torch.no_grad()
    def _dev_loss(self, cross_entropy: bool = False, items: Optional[List[Tokenized]] = None, batch_mean: bool = False) -> float:
        """The training objective (or, with ``cross_entropy``, the student's cross-entropy) on the dev set's reference
        responses (``items``, default the dev set), as a token mean or (``batch_mean``) the mean of the
        per-batch token means (every process computes it)."""
        items = self.dev_items if items is None else items
        total, n, means = 0.0, 0, []
        model = self.acc.unwrap_model(self.student).eval()
        method = self.cfg.method
        if cross_entropy or (self.teacher is None and kd_weight(method) > 0):  # a cached teacher covers train only: dev CE
            method = replace(method, kd_ratio=0.0)
        needs_teacher = kd_weight(method) > 0
        starts = range(0, len(items), self.cfg.train.batch_size)
        for i in tqdm(starts, desc="dev loss", leave=False, disable=not self.acc.is_main_process or len(starts) < 4):
            b = collate(items[i:i + self.cfg.train.batch_size], self.tok.pad_token_id).to(self.acc.device)
            b = self.cross.apply(b) if self.cross is not None else b  # (a teacher cache covers train only)
            t = teacher_targets(self.teacher, b, self.vocab) if needs_teacher else None
            s, target = response_logits(model, b.input_ids, b.attention_mask, b.labels, self.vocab)
            loss = float(token_loss(s, t, target, method).sum())
            total, n = total + loss, n + int(target.numel())
            means.append(loss / max(int(target.numel()), 1))
        return sum(means) / max(len(means), 1) if batch_mean else total / max(n, 1)

    def _evaluate_dev(self) -> float:
        """Greedy ROUGE-L on the first ``train.dev_rouge`` dev prompts (main process; every process when the student is
        sharded, since its forwards are collective)."""
        score, runs = 0.0, self.acc.is_main_process or self.sharded
        if runs:
            model = self.acc.unwrap_model(self.student).eval()
            ecfg = replace(self.cfg.eval, do_sample=False)
            dev = self.dev[:self.cfg.train.dev_rouge]
            texts = generate_texts(model, self.tok, [e.prompt for e in dev], ecfg, None, desc="dev ROUGE-L")
            score = sum(rouge_l(t, e.references) for t, e in zip(texts, dev)) / len(dev)
        self.acc.wait_for_everyone()
        return score

    def _keep_if_best(self, score: float) -> None:
        """Save ``best/`` when ``score`` (higher is better: dev ROUGE-L, or minus the dev loss) beats the best so far."""
        if self.cfg.train.keep_best and (self.state.best is None or score > self.state.best):
            self.state.best, self.state.best_step = score, self.state.step
            if self.acc.is_main_process or self.sharded:
                checkpoint.save_model(self, self.out / "best")
        self.acc.wait_for_everyone()

    def _announce(self, rec: Dict[str, Any]) -> None:
        """Print a dev evaluation's figures as soon as they are computed (main process)."""
        if not self.acc.is_main_process:
            return
        parts = [f"loss {rec['dev_loss']:.4f}"] + ([f"CE {rec['dev_ce']:.4f}"] if "dev_ce" in rec else [])
        if "dev_rougeL" in rec:
            parts.append(f"ROUGE-L {rec['dev_rougeL']:.2f} ({min(self.cfg.train.dev_rouge, len(self.dev))} prompts)")
        best = f"; best so far: step {self.state.best_step}" if self.cfg.train.keep_best and self.state.best_step >= 0 else ""
        tqdm.write(f"step {self.state.step}/{self.total} dev ({len(self.dev_items)} examples): {', '.join(parts)}{best}")

    def _log(self, rec: Dict[str, Any]) -> None:
        if self.acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        if self.acc.trackers:
            self.acc.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=self.state.step)

    def _finish(self) -> Path:
        """Write ``final/``: the best dev checkpoint when kept, else the last weights."""
        final, best = self.out / "final", self.out / "best"
        if self.cfg.train.keep_best and self.state.best_step >= 0 and (self.sharded or best.is_dir()):
            if self.acc.is_main_process:  # (sharded: every process decides alike from the state)
                shutil.rmtree(final, ignore_errors=True)
                shutil.copytree(best, final)
                by = f"dev ROUGE-L {self.state.best:.2f}" if self.cfg.train.dev_rouge else f"dev loss {-self.state.best:.4f}"
                tqdm.write(f"final/ is the best dev checkpoint: step {self.state.best_step} ({by})")
        elif self.acc.is_main_process or self.sharded:
            checkpoint.save_model(self, final)
        self.acc.wait_for_everyone()
        self.source.close()
        self.acc.end_training()
        if self.cfg.output.push_to_hub and self.acc.is_main_process:
            from switchkd.model_card import push

            tqdm.write(f"final/ uploaded to {push(final, self.cfg.output.push_to_hub, self.cfg.output.hub_private)}")
        return final


def scheduler_name(train_cfg: Any) -> str:
    """transformers' schedule for ``train.scheduler``: ``constant`` with ``train.warmup_steps`` warms up linearly first
    (transformers' ``constant`` ignores warm-up; LMOps' ``constant_trm`` warms up, then holds)."""
    if train_cfg.scheduler == "constant" and train_cfg.warmup_steps:
        return "constant_with_warmup"
    return train_cfg.scheduler


def train(cfg: Config) -> Path:
    """Run training for ``cfg``; returns ``<output.dir>/final``."""
    try:
        return Trainer(cfg).fit()
    finally:
        release_lock(Path(cfg.output.dir))

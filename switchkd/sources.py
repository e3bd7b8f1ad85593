"""Sequence sources: which sequences a training batch holds.

A source turns a dataset batch (:func:`switchkd.data.build_batch`) into the batch the
loss sees.  Sources that decode use the one rollout engine.  A batch may carry
``teacher_selected [N, V]``: the teacher's logits at its N response tokens (row-major; a sparse
:class:`switchkd.divergences.TopK` when they come from the teacher cache),
already computed during a SWITCH rollout, which the loss then uses instead of a second
teacher forward.  They are exact targets because the teacher saw the same (possibly
primed) prefix with the same weights; batches without them (dataset batches, student
rollouts, which do not run the teacher) get one teacher forward in the loss.
"""

from __future__ import annotations

import random
import sys
from collections import deque
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import Tensor

from switchkd.config import Config
from switchkd.data import build_batch
from switchkd.distributed import all_ranks
from switchkd.losses import response_logits
from switchkd.rollout import RolloutOutput, from_method, rollout

Batch = Dict[str, Any]
BUCKETS = (0, 8, 16, 32, 64, 128, 256)


@torch.no_grad()
def teacher_targets(teacher: Any, batch: Batch, vocab: int) -> Tensor:
    """The teacher's logits at the response tokens, ``[N, V]``, aligned with the student's.

    With priming the teacher reads ``teacher_input_ids`` (its prefix + the same response);
    each side's own ``labels`` select the positions, so no offset arithmetic is involved.
    """
    if batch.get("teacher_selected") is not None:
        return batch["teacher_selected"]
    if "teacher_input_ids" in batch:
        return response_logits(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"],
                               batch["teacher_labels"], vocab)[0]
    return response_logits(teacher, batch["input_ids"], batch["attention_mask"], batch["labels"], vocab)[0]


def _rows(ids: Tensor, mask: Tensor) -> List[List[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


class DatasetSource:
    """Ground-truth responses, unchanged (SFT, word-level KD, BiLD)."""

    def __init__(self, cfg: Config, student: Any, teacher: Optional[Any], tokenizer: Any, vocab: int,
                 unwrap: Callable[[Any], Any] = lambda m: m, seed: int = 0) -> None:
        self.cfg, self.student, self.teacher, self.tok, self.vocab = cfg, student, teacher, tokenizer, vocab
        self.unwrap, self.rng = unwrap, random.Random(seed)
        # per-batch choices (rollout or not) draw from an RNG that every process seeds alike, so that with
        # sharded models (collective forwards) all processes roll out together; row-level draws use ``rng``
        self.shared = random.Random(cfg.train.seed * 1000 + 999)

    def __call__(self, batch: Batch, step: int) -> Batch:
        return batch

    def rollout_config(self, rcfg: Any) -> Any:
        """The :class:`RolloutConfig` this source decodes with (a source changes the engine's rule here)."""
        return rcfg

    def step_batches(self, batches: Iterator[Batch], step: int, n: int) -> List[Batch]:
        """The ``n`` micro-batches of one optimizer step, drawn from ``batches`` (the trainer's iterator)."""
        return [self(next(batches), step) for _ in range(n)]

    #: train the student with dropout on (False: eval mode during the update too, as RL-style methods do)
    dropout = True

    def stats(self) -> Dict[str, float]:
        """Diagnostics to log since the last call."""
        return {}

    dev_metric = "objective"  # what on_validation receives: the training objective on dev, or "ce"
    validation = "eval_every"  # when on_validation is called: at train.eval_every steps, or after each "epoch"
    dev_limit: Optional[int] = None  # on_validation's own dev set (the first N of data.dev; None: eval.limit's)
    dev_batch_mean = False  # on_validation's loss: the mean of per-batch means (True) or of all tokens
    total_steps = 1  # optimizer steps of the run (set by the trainer; schedules read it)
    sharded = False  # set by the trainer under FSDP / ZeRO-3: rollouts are collective

    def on_validation(self, dev_loss: float) -> None:
        """Called with the dev loss (``dev_metric``) at each evaluation."""

    def state_dict(self) -> Dict[str, Any]:
        return {"rng": self.rng.getstate(), "shared": self.shared.getstate()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        if "shared" in state:
            self.shared.setstate(state["shared"])

    def _rollout(self, batch: Batch, source: str, keep_teacher: bool = False,
                 greedy: bool = False) -> tuple[Batch, RolloutOutput]:
        """Decode responses for the batch's prompts (``greedy``: argmax whatever ``method.do_sample``)
        and rebuild it around them."""
        device, P = batch["prompt_ids"].device, batch["prompt_ids"].shape[1]
        rcfg = from_method(self.cfg.method, source, min(self.cfg.method.max_new_tokens, self.cfg.data.max_length - P),
                           self.tok, self.vocab, keep_teacher)
        rcfg = self.rollout_config(rcfg)
        rcfg.seed = self.rng.getrandbits(62)  # sampling from the source's own (checkpointed) RNG: resumes exactly
        rcfg.do_sample = rcfg.do_sample and not greedy
        student = self.unwrap(self.student)
        was_training = student.training
        student.eval()
        out = rollout(student, self.teacher, batch["prompt_ids"], batch["prompt_mask"], rcfg,
                      batch.get("teacher_prompt_ids"), batch.get("teacher_prompt_mask"))
        student.train(was_training)
        responses = [out.sequences[i, P:][out.response_mask[i]].tolist() for i in range(out.sequences.shape[0])]
        t_prompts = _rows(batch["teacher_prompt_ids"], batch["teacher_prompt_mask"]) if "teacher_prompt_ids" in batch else None
        new = build_batch(_rows(batch["prompt_ids"], batch["prompt_mask"]), responses, self.tok.pad_token_id,
                          batch["index"].tolist(), t_prompts)
        new = {k: v.to(device) for k, v in new.items()}
        if keep_teacher:
            new["teacher_selected"] = out.teacher_logits[out.response_mask]
        return new, out


class TeacherSource(DatasetSource):
    """SeqKD: the teacher's response to each prompt, generated once and reused every epoch
    (the same as ``switchkd generate`` followed by SFT)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.cache: Dict[int, List[int]] = {}

    def __call__(self, batch: Batch, step: int) -> Batch:
        idx = batch["index"].tolist()
        missing = [i for i, k in enumerate(idx) if k not in self.cache]
        if missing:
            sub = {k: (v[missing] if isinstance(v, Tensor) else v) for k, v in batch.items()}
            gen, _ = self._rollout(sub, "teacher")
            for i, row in enumerate(gen["labels"]):
                self.cache[idx[missing[i]]] = row[row != -100].tolist()
        prompts = _rows(batch["prompt_ids"], batch["prompt_mask"])
        t_prompts = _rows(batch["teacher_prompt_ids"], batch["teacher_prompt_mask"]) if "teacher_prompt_ids" in batch else None
        new = build_batch(prompts, [self.cache[k] for k in idx], self.tok.pad_token_id, idx, t_prompts)
        return {k: v.to(batch["input_ids"].device) for k, v in new.items()}

    def state_dict(self) -> Dict[str, Any]:
        return super().state_dict() | {"cache": self.cache}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.cache = state["cache"]


class StudentSource(DatasetSource):
    """ImitKD: fresh student samples every batch."""

    def __call__(self, batch: Batch, step: int) -> Batch:
        return self._rollout(batch, "student")[0]


class ImitkdSource(DatasetSource):
    """ImitKD (Lin et al. 2020): each sequence's response is the dataset's with probability beta, else the
    student's greedy decoding of the prompt (the student's own prefix).  beta anneals from 1 (all dataset)
    at the first step: ``exponential`` ``base^(-t/N)`` as every official config (asappresearch/imitkd:
    base 200 for translation, 10 for summarisation), or ``linear`` to 0 at the last step.  Targets:
    ``full`` ("ImitKD+Full") keeps the sequences for the method's divergence to the teacher's
    distributions on every row; ``argmax`` ("ImitKD") relabels the student rows with the teacher's
    argmax token at each position and keeps the gold tokens on dataset rows (trained by CE)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.counts = {"dataset_rows": 0, "student_rows": 0}

    def beta(self, step: int) -> float:
        """Probability of the dataset response at optimizer step ``step`` (0-based)."""
        m = self.cfg.method.imitkd
        if m.schedule == "exponential":
            return m.base ** (-step / max(self.total_steps, 1))
        return max(0.0, 1.0 - step / max(self.total_steps - 1, 1))

    def __call__(self, batch: Batch, step: int) -> Batch:
        b = self.beta(step)
        rows = [i for i in range(batch["input_ids"].shape[0]) if self.rng.random() >= b]
        self.counts["student_rows"] += len(rows)
        self.counts["dataset_rows"] += batch["input_ids"].shape[0] - len(rows)
        anyone = not all_ranks(not rows, batch["input_ids"].device) if self.sharded else bool(rows)  # collective
        if not anyone:
            return batch
        # (sharded: a process with no student rows still decodes one, discarded, while another process decodes)
        sub = {k: (v[rows or [0]] if isinstance(v, Tensor) else v) for k, v in batch.items()}
        gen, _ = self._rollout(sub, "student", greedy=True)
        if not rows:
            return batch
        student = {idx: gen["labels"][j][gen["labels"][j] != -100].tolist() for j, idx in enumerate(rows)}
        responses = [student[i] if i in student else row[row != -100].tolist() for i, row in enumerate(batch["labels"])]
        prompts = _rows(batch["prompt_ids"], batch["prompt_mask"])
        t_prompts = _rows(batch["teacher_prompt_ids"], batch["teacher_prompt_mask"]) if "teacher_prompt_ids" in batch else None
        new = build_batch(prompts, responses, self.tok.pad_token_id, batch["index"].tolist(), t_prompts)
        new = {k: v.to(batch["input_ids"].device) for k, v in new.items()}
        if self.cfg.method.imitkd.targets == "argmax":
            new["labels"] = self.argmax_labels(new, rows)
        return new

    @torch.no_grad()
    def argmax_labels(self, batch: Batch, rows: List[int]) -> Tensor:
        """``labels [B, T]`` with each response token of ``rows`` replaced by the teacher's argmax at that
        position given the (student's) prefix; other rows keep their gold tokens."""
        labels = batch["labels"].clone()
        if not rows:
            return labels
        idx = torch.tensor(rows, device=labels.device)
        ids, mask = batch["input_ids"][idx], batch["attention_mask"][idx]
        pred = self.teacher(ids, attention_mask=mask).logits[:, :, : self.vocab].argmax(-1)  # [b, T] next tokens
        sub = labels[idx]
        keep = sub[:, 1:] != -100
        sub[:, 1:] = torch.where(keep, pred[:, :-1], sub[:, 1:])
        labels[idx] = sub
        return labels

    def stats(self) -> Dict[str, float]:
        out = {f"imitkd/{k}": v for k, v in self.counts.items()}
        self.counts = dict.fromkeys(self.counts, 0)
        return out


class MixtureSource(DatasetSource):
    """GKD: each batch is student-generated with probability ``method.mixture.student_ratio`` (lambda), else the
    dataset's, or with ``method.mixture.seq_kd`` (TRL's option) the teacher's sampled responses, fresh each time
    (no dropout while it generates nor while it trains, as TRL's ``disable_dropout=True``)."""

    dropout = False

    def __call__(self, batch: Batch, step: int) -> Batch:
        if self.shared.random() < self.cfg.method.mixture.student_ratio:
            return self._rollout(batch, "student")[0]
        if self.cfg.method.mixture.seq_kd:
            return self._rollout(batch, "teacher")[0]
        return batch


class DistillmSource(DatasetSource):
    """DistiLLM's adaptive off-policy student-generated outputs (SGO), by the rules of the official
    ``finetune.py`` (jongwooko/distillm).

    ``p`` (``--init-threshold``) starts at ``init_student_prob``.  For each batch, with ``u ~ U(0, 1)``
    and the fresh-sample threshold ``s`` = ``p * (1 - step / total)`` (``replay_schedule=decreasing``,
    the official default), ``p * replay_ratio`` (``constant``) or ``p * step / total`` (``increasing``),
    ``step`` counted from 1: the batch is generated fresh by the student (and stored in the replay
    buffer) when ``u < s``, or when ``u < p`` while the buffer is not yet full (``replay_size``); drawn
    from the buffer when ``u < p``; else it is the dataset batch.  The reference dev loss is the
    student's cross-entropy on the dev references, measured once before training; at each evaluation
    whose dev CE is at least ``loss_eps`` above the reference, ``p`` rises by ``student_prob_step`` (at
    most ``max_student_prob``, officially 1.0) and the reference becomes that dev CE.  Evaluations
    happen after each epoch on the first ``dev_limit`` (``--dev-num``, 1000) dev examples, the loss being
    the mean of per-batch mean CEs, as the official ``evaluate``; ``validate=eval_every`` evaluates at
    every ``train.eval_every`` steps on ``eval.limit`` examples instead (token mean).
    """

    dev_metric = "ce"  # what on_validation receives: the student's CE on the dev references

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        m = self.cfg.method.distillm
        if m.validate == "epoch":  # official finetune.py: evaluate() after each epoch over --dev-num examples,
            self.validation, self.dev_limit, self.dev_batch_mean = "epoch", m.dev_limit, True  # per-batch means
        self.p = self.cfg.method.distillm.init_student_prob
        self.buffer: deque = deque(maxlen=self.cfg.method.distillm.replay_size)
        self.reference: Optional[float] = None
        self.counts = {"dataset": 0, "fresh": 0, "replay": 0}

    def decide(self, u: float, step: int) -> str:
        """``dataset``, ``fresh`` or ``replay`` for a draw ``u`` at optimizer step ``step`` (0-based)."""
        m, frac = self.cfg.method.distillm, min(1.0, (step + 1) / max(self.total_steps, 1))
        s = {"decreasing": self.p * (1 - frac), "constant": self.p * m.replay_ratio,
             "increasing": self.p * frac}[m.replay_schedule]
        if u < s or (u < self.p and len(self.buffer) < m.replay_size):
            return "fresh"
        return "replay" if u < self.p else "dataset"

    def __call__(self, batch: Batch, step: int) -> Batch:
        n = batch["input_ids"].shape[0]
        choice = self.decide(self.shared.random(), step)
        if choice == "replay" and len(self.buffer) < n:
            choice = "fresh"  # only when replay_size < batch size
        self.counts[choice] += 1
        if choice == "dataset":
            return batch
        if choice == "replay":
            rows = self.rng.sample(list(self.buffer), n)
            new = build_batch([r[0] for r in rows], [r[1] for r in rows], self.tok.pad_token_id, [r[2] for r in rows],
                              [r[3] for r in rows] if rows[0][3] is not None else None)
            return {k: v.to(batch["input_ids"].device) for k, v in new.items()}
        new, _ = self._rollout(batch, "student")
        prompts = _rows(new["prompt_ids"], new["prompt_mask"])
        t_prompts = _rows(new["teacher_prompt_ids"], new["teacher_prompt_mask"]) if "teacher_prompt_ids" in new else None
        for i, row in enumerate(new["labels"]):
            self.buffer.append((prompts[i], row[row != -100].tolist(), int(new["index"][i]),
                                t_prompts[i] if t_prompts else None))
        return new

    def on_validation(self, dev_loss: float) -> None:
        """The first call sets the reference (the evaluation before training); later ones may raise p."""
        m = self.cfg.method.distillm
        if self.reference is None:
            self.reference = dev_loss
        elif dev_loss >= self.reference + m.loss_eps:
            self.p = min(self.p + m.student_prob_step, m.max_student_prob)
            self.reference = dev_loss

    def stats(self) -> Dict[str, float]:
        out = {"distillm/student_prob": self.p, **{f"distillm/{k}_batches": v for k, v in self.counts.items()}}
        if self.reference is not None:
            out["distillm/reference_dev_ce"] = self.reference
        self.counts = dict.fromkeys(self.counts, 0)
        return out

    def state_dict(self) -> Dict[str, Any]:
        return super().state_dict() | {"p": self.p, "buffer": list(self.buffer), "reference": self.reference}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.p, self.reference = state["p"], state.get("reference")
        self.buffer.extend(state["buffer"])


def saturation_warning(share: float, tokens: int, tau0: float) -> Optional[str]:
    """The message for a logging window whose teacher share is saturated (>= 0.95 or <= 0.05), else None:
    SWITCH then degenerates into SeqKD-like (teacher writes all) or on-policy (student writes all) data."""
    if 0.05 < share < 0.95:
        return None
    who, fix = (("the teacher", "raise method.switch.tau0, or start from an SFT-fine-tuned student")
                if share >= 0.95 else ("the student", "lower method.switch.tau0"))
    return (f"SWITCH: {who} wrote {100 * share:.0f}% of the last {tokens} response tokens (tau0 {tau0:g}): the gate "
            f"is saturated; {fix}, or find tau0 with switchkd calibrate CONFIG --target 0.53")


class SwitchSource(DatasetSource):
    """SWITCH sequences (with probability ``method.switch.ratio``, else dataset batches).

    The teacher logits of the rollout become the loss targets; diagnostics: the share of
    teacher-written tokens overall and by position bucket, and the mean gate by position.
    """

    prefix = "switch"  # of the logged diagnostics
    warn_saturation = True

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._reset()

    def _reset(self) -> None:
        k = len(BUCKETS)
        self.n, self.teacher_n, self.gate_sum = torch.zeros(k), torch.zeros(k), torch.zeros(k)

    def __call__(self, batch: Batch, step: int) -> Batch:
        if self.shared.random() >= self.cfg.method.switch.ratio:
            return batch
        new, out = self._rollout(batch, "switch", keep_teacher=True)
        pos = torch.arange(out.response_mask.shape[1], device=out.response_mask.device).expand_as(out.response_mask)
        bucket = torch.bucketize(pos[out.response_mask], torch.tensor(BUCKETS[1:], device=pos.device), right=True).cpu()
        self.n += torch.bincount(bucket, minlength=len(BUCKETS)).float()
        self.teacher_n += torch.bincount(bucket, weights=out.from_teacher[out.response_mask].float().cpu(),
                                         minlength=len(BUCKETS))
        self.gate_sum += torch.bincount(bucket, weights=out.gate[out.response_mask].float().cpu(), minlength=len(BUCKETS))
        return new

    def stats(self) -> Dict[str, float]:
        if self.n.sum() == 0:
            return {}
        p = self.prefix
        out = {f"{p}/teacher_frac": float(self.teacher_n.sum() / self.n.sum())}
        warning = saturation_warning(out[f"{p}/teacher_frac"], int(self.n.sum()), self.cfg.method.switch.tau0) \
            if self.warn_saturation else None
        if warning:
            print(f"switchkd: warning: {warning}", file=sys.stderr)
        for i, lo in enumerate(BUCKETS):
            if self.n[i] > 0:
                name = f"{lo}-{BUCKETS[i + 1] - 1}" if i + 1 < len(BUCKETS) else f"{lo}+"
                out[f"{p}/teacher_frac@{name}"] = float(self.teacher_n[i] / self.n[i])
                out[f"{p}/gate@{name}"] = float(self.gate_sum[i] / self.n[i])
        self._reset()
        return out


SOURCES = {"dataset": DatasetSource, "teacher": TeacherSource, "student": StudentSource, "imitkd": ImitkdSource,
           "mixture": MixtureSource,
           "distillm": DistillmSource, "switch": SwitchSource}


def make_source(cfg: Config, student: Any, teacher: Optional[Any], tokenizer: Any, vocab: int,
                unwrap: Callable[[Any], Any] = lambda m: m, seed: int = 0) -> DatasetSource:
    """The source named by ``cfg.method.source``."""
    if cfg.method.source == "minillm":
        from switchkd.minillm import MinillmSource  # it builds on this module's DatasetSource

        return MinillmSource(cfg, student, teacher, tokenizer, vocab, unwrap, seed)
    if cfg.method.source == "skd":
        from switchkd.skd import SkdSource  # it builds on this module's SwitchSource

        return SkdSource(cfg, student, teacher, tokenizer, vocab, unwrap, seed)
    return SOURCES[cfg.method.source](cfg, student, teacher, tokenizer, vocab, unwrap, seed)

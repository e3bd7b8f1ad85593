"""Who writes each response token: the one per-step decision rule every decode loop takes.

A rule looks at the two models' next-token distributions at response positions and decides, per row and
position, whether the teacher writes the token there.  The loops (:func:`switchkd.rollout.rollout`, lockstep;
:func:`switchkd.speculative.speculative_switch`, draft-and-verify; :func:`switchkd.interleave.cross_switch`,
across vocabularies; :func:`switchkd.drafted.drafted_rollout`, vLLM drafts) only sample, feed and record; the
decision is :meth:`Rule.decide`'s, the same code in every loop:

- :class:`StudentWrites`: on-policy sampling (GKD, DistiLLM, ImitKD);
- :class:`TeacherWrites`: the teacher's samples (SeqKD);
- :class:`Mixture`: MiniLLM's teacher-mixed sampling, each token from ``alpha p + (1 - alpha) q``;
- :class:`Gate`: SWITCH (Koo et al., NAACL Findings 2025): the teacher writes where a divergence of the two
  distributions exceeds tau_t (``exp``: tau0 e^(-decay t); ``linear``: tau0 max(0, 1 - decay t); ``const``: tau0);
- :class:`Rank`: SKD (Xu et al., ICLR 2025): the teacher replaces a student proposal outside its top K.

A rule that decides about a student proposal from the distributions at that position alone (``verifiable``) can
decide a whole drafted block at once; the draft-and-verify loops take only those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Optional, Union

import torch
from torch import Tensor

from switchkd.divergences import DEFAULT_GATE, GATE_MAXIMA, GATES

SCHEDULES = ("exp", "linear", "const")
Positions = Union[int, Tensor]


@dataclass(frozen=True)
class Decision:
    """A rule's decision at response positions (shape ``[...]``: ``[B]`` for one step, ``[B, k]`` for a block).

    Attributes:
        teacher_writes: ``[...]`` bool, where the teacher writes the token.
        gate: ``[...]`` the value compared with the threshold (NaN where the rule has none).
        mixture: ``[..., V]`` log-probabilities to sample the token from instead of either model's (a
            :class:`Mixture` without a student proposal), else None.
        teacher_sampling: ``[..., V]`` the rule's own warped teacher logits, which the teacher's tokens are drawn from
            as they are (no further warping), else None (the loop's sampling settings).
    """

    teacher_writes: Tensor
    gate: Tensor
    mixture: Optional[Tensor] = None
    teacher_sampling: Optional[Tensor] = None


def _nan(shape: torch.Size, like: Tensor) -> Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32, device=like.device)


class Rule:
    """The base of every rule: who writes the token at each row's response position.

    Class attributes say what a loop must provide: ``uses_student``/``uses_teacher`` (which models run),
    ``reads_proposal`` (``decide`` needs the student's proposed token, sampled first), ``verifiable`` (decided
    from the distributions at each position: a drafted block can be verified at once) and ``samples_mixture``
    (every token is a sample of a mixture: the writer is not recorded, the student's log-probability is).
    """

    uses_student: ClassVar[bool] = True
    uses_teacher: ClassVar[bool] = True
    reads_proposal: ClassVar[bool] = False
    verifiable: ClassVar[bool] = False
    samples_mixture: ClassVar[bool] = False

    def decide(self, student_logits: Optional[Tensor], teacher_logits: Optional[Tensor], positions: Positions,
               proposal: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Decision:
        """Decide at response positions.

        Args:
            student_logits: ``[..., V_s]`` the student's next-token logits (None if the rule does not use it).
            teacher_logits: ``[..., V_t]`` the teacher's (None if the rule does not use it).
            positions: the response position of each decision (0 = the first generated token): an int for one
                step of every row, or a tensor of shape ``[...]``.
            proposal: ``[...]`` the student's proposed tokens (drafts), in the teacher's ids for a rule that
                reads them (-1: a token the teacher cannot spell).
            generator: the loop's random generator (a :class:`Mixture` drawing its writer).

        Returns:
            The :class:`Decision` of shape ``[...]``.
        """
        raise NotImplementedError

    def across(self, measure_for: Callable[[str, str], Callable[[Tensor, Tensor], Tensor]]) -> "Rule":
        """This rule across vocabularies: a comparison of the two distributions by a divergence of
        :data:`switchkd.divergences.GATES` becomes ``measure_for(divergence, cross)(student_logits, teacher_logits)``
        (:func:`switchkd.interleave.cross_gate`); a rule that compares no distributions is unchanged."""
        return self


def _shape(student_logits: Optional[Tensor], teacher_logits: Optional[Tensor]) -> tuple:
    ref = student_logits if student_logits is not None else teacher_logits
    return ref.shape[:-1], ref


@dataclass(frozen=True)
class StudentWrites(Rule):
    """The student writes every token (on-policy sampling)."""

    uses_teacher: ClassVar[bool] = False

    def decide(self, student_logits: Optional[Tensor], teacher_logits: Optional[Tensor], positions: Positions,
               proposal: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Decision:
        shape, ref = _shape(student_logits, teacher_logits)
        return Decision(torch.zeros(shape, dtype=torch.bool, device=ref.device), _nan(shape, ref))


@dataclass(frozen=True)
class TeacherWrites(Rule):
    """The teacher writes every token (SeqKD's teacher samples)."""

    uses_student: ClassVar[bool] = False

    def decide(self, student_logits: Optional[Tensor], teacher_logits: Optional[Tensor], positions: Positions,
               proposal: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Decision:
        shape, ref = _shape(teacher_logits, student_logits)
        return Decision(torch.ones(shape, dtype=torch.bool, device=ref.device), _nan(shape, ref))


def mix_logprobs(q: Tensor, p: Tensor, alpha: float) -> Tensor:
    """``log(alpha * exp(p) + (1 - alpha) * exp(q))`` from log-probabilities ``q``, ``p`` (any shape)."""
    if alpha <= 0.0 or alpha >= 1.0:
        return p if alpha >= 1.0 else q
    return torch.logaddexp(q + math.log1p(-alpha), p + math.log(alpha))


@dataclass(frozen=True)
class Mixture(Rule):
    """MiniLLM's teacher-mixed sampling (Gu et al., ICLR 2024): each token is a sample of ``alpha p + (1 - alpha) q``.

    Without a proposal the decision carries the mixture's log-probabilities (the loop samples from them with its
    settings); with a student proposal (a draft, or a token of another vocabulary) the teacher writes with
    probability ``alpha``, else the proposal stands, which at temperature 1 is a sample of the same mixture.
    """

    alpha: float = 0.2
    samples_mixture: ClassVar[bool] = True

    def decide(self, student_logits: Optional[Tensor], teacher_logits: Optional[Tensor], positions: Positions,
               proposal: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Decision:
        if proposal is None:
            q, p = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
            shape = q.shape[:-1]
            return Decision(torch.zeros(shape, dtype=torch.bool, device=q.device), _nan(shape, q),
                            mix_logprobs(q, p, self.alpha))
        device = generator.device if generator is not None else proposal.device
        draw = torch.rand(proposal.shape, generator=generator, device=device).to(proposal.device)
        return Decision(draw < self.alpha, _nan(proposal.shape, proposal))


@dataclass(frozen=True)
class Gate(Rule):
    """SWITCH's rule: the teacher writes where ``divergence(q, p) > tau_t``.

    Attributes:
        tau0: the threshold at the first response token (inf: never; 0 with a non-negative divergence: wherever the
            two differ).
        decay: lambda, the threshold's decay per response token.
        schedule: ``exp`` (tau0 e^(-decay t)), ``linear`` (tau0 max(0, 1 - decay t)) or ``const`` (tau0).
        divergence: a name of :data:`switchkd.divergences.GATES`.
        cross: across vocabularies, what the gate compares (:data:`switchkd.interleave.CROSS_GATES`).
        measure: the gate's value from ``(student_logits, teacher_logits)`` when it is not ``GATES[divergence]``
            (across vocabularies: :func:`switchkd.interleave.cross_gate`).
    """

    tau0: float = 0.1
    decay: float = 0.1
    schedule: str = "exp"
    divergence: str = DEFAULT_GATE
    cross: str = "shared"
    measure: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    verifiable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be exp, linear or const, got {self.schedule!r}")

    def across(self, measure_for: Callable[[str, str], Callable[[Tensor, Tensor], Tensor]]) -> "Gate":
        return replace(self, measure=measure_for(self.divergence, self.cross))

    @property
    def maximum(self) -> Optional[float]:
        """The largest value the gate's divergence can take (None: unbounded): a tau_t above it never fires."""
        return GATE_MAXIMA.get(self.divergence)

    def threshold(self, position: int) -> float:
        """tau_t for response position ``position``."""
        if not math.isfinite(self.tau0) or self.schedule == "const":
            return self.tau0
        if self.schedule == "exp":
            return self.tau0 * math.exp(-self.decay * position)
        return self.tau0 * max(0.0, 1.0 - self.decay * position)

    def thresholds(self, positions: Tensor) -> Tensor:
        """tau_t for a tensor of response positions (any shape), as float64 tensor ops (no host sync)."""
        t = positions.double()
        if not math.isfinite(self.tau0) or self.schedule == "const":
            return torch.full_like(t, self.tau0)
        if self.schedule == "exp":
            return self.tau0 * torch.exp(-self.decay * t)
        return self.tau0 * (1.0 - self.decay * t).clamp(min=0.0)

    def exceeds(self, gate: Tensor, positions: Positions) -> Tensor:
        """``gate [...] > tau_t`` at ``positions`` (an int, or a tensor of the gate's shape)."""
        tau = self.threshold(positions) if isinstance(positions, int) else self.thresholds(positions).to(gate.dtype)
        return gate > tau

    def decide(self, student_logits: Optional[Tensor], teacher_logits: Optional[Tensor], positions: Positions,
               proposal: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Decision:
        measure = self.measure or GATES[self.divergence]
        gate = measure(student_logits, teacher_logits)
        return Decision(self.exceeds(gate, positions), gate)


@dataclass(frozen=True)
class Rank(Rule):
    """SKD's rule: the teacher replaces the student's proposal where it is not among the teacher's top K.

    The gate is the proposal's rank under the teacher (0 = its argmax; a proposal the teacher cannot spell ranks
    last, V); the teacher writes where the rank is at least ``top_k``.  With ``temperature``/``top_p`` (the SKD
    authors' ``teacher_temperature``/``teacher_top_p``, google-research ``speculative_kd``) the rank is taken under
    the teacher's warped distribution, where a token outside its nucleus has probability 0 and is never accepted, and
    the teacher's tokens are sampled from that warped distribution (``Decision.teacher_sampling``).
    """

    top_k: float = 25
    temperature: float = 1.0
    top_p: float = 1.0
    reads_proposal: ClassVar[bool] = True
    verifiable: ClassVar[bool] = True

    @property
    def warps(self) -> bool:
        """Whether the rule ranks (and the teacher samples) under a warped teacher distribution."""
        return self.temperature != 1.0 or self.top_p < 1.0

    def warped(self, teacher_logits: Tensor) -> Tensor:
        """``[..., V]`` the teacher's logits after temperature and top-p (transformers' warpers; -inf outside the
        nucleus)."""
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        if self.temperature != 1.0:
            flat = TemperatureLogitsWarper(self.temperature)(None, flat)
        if self.top_p < 1.0:
            flat = TopPLogitsWarper(self.top_p)(None, flat)
        return flat.reshape(teacher_logits.shape)

    def decide(self, student_logits: Optional[Tensor], teacher_logits: Optional[Tensor], positions: Positions,
               proposal: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Decision:
        sampling = self.warped(teacher_logits) if self.warps else None
        if sampling is not None:
            teacher_logits = sampling
        vocab = teacher_logits.shape[-1]
        known = (proposal >= 0) & (proposal < vocab)
        chosen = teacher_logits.gather(-1, proposal.clamp(0, vocab - 1)[..., None])
        rank = (teacher_logits > chosen).sum(-1).to(teacher_logits.dtype)
        known = known & (chosen.squeeze(-1) > -float("inf"))  # outside a warped nucleus: never accepted
        rank = torch.where(known, rank, torch.full_like(rank, float(vocab)))
        return Decision(rank > self.top_k - 0.5, rank, teacher_sampling=sampling)


__all__ = ["GATES", "SCHEDULES", "Decision", "Gate", "Mixture", "Rank", "Rule", "StudentWrites", "TeacherWrites",
           "mix_logprobs"]

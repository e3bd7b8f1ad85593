"""Rollout settings for the engine tests: a decoding config and the rule, from the keywords a test varies."""

from switchkd.rollout import RolloutConfig
from switchkd.rules import Gate, Mixture, Rank, Rule, StudentWrites, TeacherWrites


def rule_for(source: str = "switch", tau0: float = 0.1, decay: float = 0.1, schedule: str = "exp",
             gate: str = "jsd", teacher_mix: float = 0.2) -> Rule:
    """``source``: student, teacher, mixed (MiniLLM's mixture, ``teacher_mix``) or switch (a gate; ``gate="rank"``: SKD's
    rank test with K = tau0 + 1/2)."""
    if source == "student":
        return StudentWrites()
    if source == "teacher":
        return TeacherWrites()
    if source == "mixed":
        return Mixture(alpha=teacher_mix)
    if gate == "rank":
        return Rank(top_k=tau0 + 0.5)  # (inf: the teacher never replaces a proposal)
    return Gate(tau0=tau0, decay=decay, schedule=schedule, divergence=gate)


RULE_KEYS = ("source", "tau0", "decay", "schedule", "gate", "teacher_mix")


def spec(**fields) -> tuple:
    """``(RolloutConfig, Rule)`` from one set of keywords (the rule's: :data:`RULE_KEYS`; the rest: the config's)."""
    rule = rule_for(**{k: v for k, v in fields.items() if k in RULE_KEYS})
    return RolloutConfig(**{k: v for k, v in fields.items() if k not in RULE_KEYS}), rule

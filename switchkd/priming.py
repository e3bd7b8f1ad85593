"""Response priming (Goyal et al. 2024): prompt prefixes that only the teacher sees.

The prefix is prepended to the rendered prompt when the teacher generates (SeqKD
data, SWITCH rollouts) and when its logits are computed for KD.  Teacher positions
are aligned to the student's response tokens by selecting each side's *own*
response positions (the prefix length never enters the indexing).
"""

from __future__ import annotations

PRIMING = {
    "none": "",
    "teacher": ("You are a teacher guiding a student. Write the answer you would want your student to learn from: "
                "correct, clear and complete.\n\n"),
    "confidence": "Double-check your answer before you respond, and make sure every part of it is correct.\n\n",
    "ground_truth": "A reference answer to the request below is:\n{reference}\n\nUse it to write your response.\n\n",
}


def priming_prefix(strategy: str, reference: str = "") -> str:
    """The teacher-only prefix for ``strategy`` (a name above, or custom text with optional ``{reference}``)."""
    text = PRIMING.get(strategy, strategy)
    return text.replace("{reference}", reference)


def teacher_prompt(strategy: str, prompt: str, reference: str = "") -> str:
    """The prompt the teacher sees."""
    return priming_prefix(strategy, reference) + prompt

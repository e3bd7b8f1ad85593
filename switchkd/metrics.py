"""Answer metrics for evaluation: ROUGE-L (the MiniLLM/DistiLLM protocol) and final-answer accuracy
for reasoning tasks (GSM8K's ``#### N`` answer line, else the last number in the text)."""

from __future__ import annotations

import re
from typing import Callable, Dict, Optional, Sequence

from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure x100, max over references."""
    return 100.0 * max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def normalize_number(text: str) -> Optional[str]:
    """``"$1,234.50"`` -> ``"1234.5"``, ``"18.00"`` -> ``"18"``; None when ``text`` holds no number."""
    m = _NUMBER.search(text)
    if m is None:
        return None
    raw = m.group(0).replace(",", "").replace("$", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def final_answer(text: str) -> Optional[str]:
    """The final answer of a worked solution: the number after the last ``####`` (GSM8K's answer line),
    else the last number in the text; normalised by :func:`normalize_number`."""
    if "####" in text:
        return normalize_number(text.rsplit("####", 1)[1])
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def accuracy(prediction: str, references: Sequence[str]) -> float:
    """100 when the prediction's final answer equals a reference's, else 0."""
    got = final_answer(prediction)
    return 100.0 if got is not None and any(got == final_answer(r) for r in references) else 0.0


METRICS: Dict[str, Callable[[str, Sequence[str]], float]] = {"rougeL": rouge_l, "accuracy": accuracy}

"""The divergence registry's declarations, without torch: each divergence's parameters and how it reads a served
teacher.  :mod:`switchkd.divergences` holds the functions (its ``DIVERGENCES``); a config is checked against this
table before torch loads, and ``tests/test_divergences.py`` keeps the two equal (each function's keyword-only
arguments besides ``temperature`` are its entry in :data:`PARAMS`).  A new divergence adds its function there and its
line here.
"""

from __future__ import annotations

from typing import Dict, Tuple

#: the registry entry that trains by cross-entropy on the sequences alone (no teacher, no divergence term)
PLAIN = "ce"

#: parameters each divergence accepts besides ``temperature``
PARAMS: Dict[str, Tuple[str, ...]] = {
    "fkl": (),
    "rkl": (),
    "jsd": ("beta",),
    "tvd": (),
    "skl": ("alpha",),
    "srkl": ("alpha",),
    "topk_kl": ("k",),
    "topk_kl_renorm": ("k",),
    "bild": ("k",),
    "ce": (),
}

#: the smallest value a divergence's parameter may take beyond the shared rule (BiLD's top-k logit loss needs pairs of
#: pairs: k >= 3)
PARAM_MINIMA: Dict[str, Dict[str, float]] = {"bild": {"k": 3}}

#: how each divergence is evaluated against a served teacher's top-k log-probabilities
#: (:class:`switchkd.divergences.TopKTail`; a divergence absent here is refused with ``teacher.server``):
#: ``bucket``: over the k + 1 outcomes (top k + tail bucket; temperature 1); ``top``: from the top k alone, exact
#: for ``params.k <= teacher.top_k``; ``none``: no teacher term
SERVED: Dict[str, str] = {
    "fkl": "bucket",
    "rkl": "bucket",
    "jsd": "bucket",
    "tvd": "bucket",
    "skl": "bucket",
    "srkl": "bucket",
    "topk_kl": "top",
    "topk_kl_renorm": "top",
    "ce": "none",
}

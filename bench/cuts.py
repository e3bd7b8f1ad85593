"""Which decoder blocks to keep: Dolly dev cross-entropy of depth-pruned cuts of a teacher, untrained.

    python bench/cuts.py [TEACHER_DIR] [--examples 16]

TEACHER_DIR defaults to the converted SmolLM2-135M-Instruct that ``bench/real.py`` caches. Each cut is
built by :func:`switchkd.shrink.cut` (what ``switchkd shrink`` saves) and scored on the responses of the
first ``--examples`` Dolly dev examples (ChatML prompts <= 128 tokens, <= 256 tokens in all), next to
the teacher and a uniform guess over the vocabulary.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from switchkd.config import DataConfig, ModelConfig  # noqa: E402
from switchkd.data import collate, load_examples, tokenize  # noqa: E402
from switchkd.losses import shifted  # noqa: E402
from switchkd.models import load_model, load_tokenizer  # noqa: E402
from switchkd.shrink import cut, even_layers  # noqa: E402

DOLLY_DEV = ROOT.parent / "shared" / "data" / "minillm_data" / "dolly" / "dev.jsonl"


def cuts(n: int) -> dict:
    """Named block selections of an ``n``-block model."""
    last = n - 1
    return {"all": list(range(n)), "drop one near the end": [i for i in range(n) if i != last - 1],
            "first 26 + last": list(range(26)) + [last],
            **{f"{k} evenly spaced": even_layers(n, k) for k in (20, 15, 10)},
            "first 19 + last": list(range(19)) + [last], "first 9 + last": list(range(9)) + [last],
            "first 8 + last 2": list(range(8)) + [last - 1, last]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path.home() / ".cache" / "switchkd" / "real" / "smollm2-135m-instruct"
    ap.add_argument("teacher", nargs="?", default=str(default))
    ap.add_argument("--examples", type=int, default=16)
    a = ap.parse_args()
    tok = load_tokenizer(ModelConfig(name=a.teacher))
    teacher = load_model(ModelConfig(name=a.teacher), tok, trainable=False)
    items, _ = tokenize(load_examples(str(DOLLY_DEV), DataConfig(format="minillm", template="chat"), tok, 4 * a.examples),
                        tok, 128, 256)
    batch = collate(items[: a.examples], tok.pad_token_id)
    n = teacher.config.num_hidden_layers
    print(f"Dolly dev CE (nats per response token, {len(items[:a.examples])} examples); uniform guess "
          f"{math.log(len(tok)):.2f}")
    print("| blocks kept | count | CE |\n|---|---:|---:|")
    for name, keep in cuts(n).items():
        model = teacher if len(keep) == n else cut(teacher, keep)
        with torch.no_grad():
            logits, target = shifted(model(batch.input_ids, attention_mask=batch.attention_mask).logits,
                                     batch.labels, len(tok))
            ce = float(torch.nn.functional.cross_entropy(logits.float(), target))
        print(f"| {name} | {len(keep)} | {ce:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Does ``switchkd prune --params N`` rank its shapes the same untrained as after a short heal?
(``python bench/params_rank.py``)

``--params`` ranks the grid's shapes within 5% of N by their *untrained* held-out cross-entropy
(:func:`switchkd.prune_shapes.choose_shape`).  This prunes every shape of the grid for ``--params`` (default 60M) of
SmolLM2-135M-Instruct (bench/real.py's teacher; importance from ``--samples`` Dolly training examples, as the
command measures it), heals each ``--steps`` steps with ``configs/smollm2/heal.yaml`` (bench/prune.py's healing
budget) and reports both rankings by Dolly dev cross-entropy per response token (64 examples).

    python bench/params_rank.py [--params 60M] [--steps 16] [--samples 128] [--out runs/bench-params-rank]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from prune import heal_overrides  # noqa: E402  (bench/prune.py's healing budget)
from real import DATA, cached, prepare_teacher, train_run  # noqa: E402
from real import dev_ce as ce  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="60M")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--out", default="runs/bench-params-rank")
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from switchkd.prune import calibration_sequences, importance, parameters, prune_model, sizes_of
    from switchkd.prune_shapes import parse_count, shapes_for
    from switchkd.rundir import write_new_dir

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    teacher = prepare_teacher(None)
    tok = AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32)
    imp = importance(model, calibration_sequences(str(DATA / "dolly" / "train.jsonl"), tok, a.samples, 256),
                     tok.pad_token_id, batch_size=8)
    rows = []
    for i, shape in enumerate(shapes_for(sizes_of(model.config), model.config, parse_count(a.params))):
        path = out / f"shape-{i}"
        if not (path / "config.json").is_file():
            student = prune_model(model, imp, shape)
            write_new_dir(path, lambda tmp, m=student: (m.save_pretrained(tmp, safe_serialization=True),
                                                         tok.save_pretrained(tmp)))
        n = parameters(AutoModelForCausalLM.from_pretrained(str(path)))
        healed = train_run("smollm2/heal", heal_overrides(path, teacher, a.steps), out / f"shape-{i}-heal")
        row = {"shape": vars(shape), "parameters": n, "before": cached(out / f"shape-{i}-ce.json", lambda p=path: ce(p, 64)),
               "after": cached(out / f"shape-{i}-heal-ce.json", lambda p=healed: ce(p, 64))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    before = sorted(range(len(rows)), key=lambda i: rows[i]["before"])
    after = sorted(range(len(rows)), key=lambda i: rows[i]["after"])
    res = {"params": a.params, "steps": a.steps, "rows": rows, "rank_untrained": before, "rank_healed": after,
           "same_best": before[0] == after[0], "minutes": (time.time() - t0) / 60}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(f"untrained ranking {before}, healed ranking {after}; the same best shape: {res['same_best']}; "
          f"{res['minutes']:.1f} min")


if __name__ == "__main__":
    main()

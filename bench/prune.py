"""Students near half of SmolLM2-135M-Instruct, the layout of Minitron's table 1 (``make bench-prune``).

Muralidharan et al. 2024 (arXiv 2407.14679) compare, at one parameter budget, depth and width pruning and random
initialisation, before and after the same distillation budget.  Here: the teacher converted from its GGUF file
(``bench/real.py``'s cache), importance measured once on Dolly training examples (chat template), and these
candidates near 67M parameters (half the teacher's 134.5M):

- ``depth-even``: 11 evenly spaced blocks (what ``switchkd shrink --layers`` kept so far);
- ``depth-bi``: the 11 blocks with the highest Block Influence;
- ``width``: hidden 384, MLP 1024, 6 of 9 query heads (2 per key/value group), all 30 blocks;
- ``width-depth``: hidden 480, MLP 1024, 6 query heads, the 22 blocks with the highest Block Influence;
- ``random``: ``width-depth``'s shape, randomly initialised (the teacher's initializer range).

Reported: parameters, Dolly dev cross-entropy per response token (64 examples) untrained and after the same healing
budget (``configs/smollm2/heal.yaml``: forward KL at T = 1 against the teacher, cosine with warm-up; ``--steps``
optimizer steps of batch 8), and the seconds each phase took.

    python bench/prune.py [--steps 16] [--samples 128] [--out runs/bench-prune] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from real import DATA, cached, prepare_models, train_run  # noqa: E402
from real import dev_ce as ce  # noqa: E402

CANDIDATES = {  # name -> prune.Shape fields (None: the teacher's), or "random" for random initialisation
    "depth-even": {"layers": 11, "even": True},
    "depth-bi": {"layers": 11},
    "width": {"hidden": 384, "mlp": 1024, "heads_per_group": 2},
    "width-depth": {"hidden": 480, "mlp": 1024, "heads_per_group": 2, "layers": 22},
    "random": {"hidden": 480, "mlp": 1024, "heads_per_group": 2, "layers": 22, "random": True},
}


def heal_overrides(student: Path, teacher: Path, steps: int) -> List[str]:
    """The overrides of ``configs/smollm2/heal.yaml`` that heal ``student`` for ``steps`` steps on Dolly's training
    set (warm-up an eighth of them, no dev set, no checkpoints): the healing budget every candidate gets."""
    return [f"model.name={student}", f"teacher.name={teacher}", f"train.max_steps={steps}",
            f"train.warmup_steps={max(1, steps // 8)}", f"data.train={DATA / 'dolly' / 'train.jsonl'}",
            "data.dev=null", "data.max_prompt_length=128", "data.max_length=256", "train.save_every=0",
            "train.eval_every=0", "train.log_every=1", "train.keep_best=false", "output.overwrite=true"]


def build(name: str, spec: Dict[str, Any], teacher: Path, imp: Any, out: Path) -> Path:
    """Write candidate ``name`` to ``out`` (reused when present)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from switchkd.prune import Shape, parameters, prune_model
    from switchkd.rundir import write_new_dir
    from switchkd.shrink import cut, even_layers

    if (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(teacher))
    fields = {k: spec[k] for k in ("hidden", "mlp", "heads_per_group", "layers") if k in spec}
    if spec.get("even"):
        student = cut(model, even_layers(model.config.num_hidden_layers, spec["layers"]))
    else:
        student = prune_model(model, imp, Shape(**fields))
    if spec.get("random"):
        torch.manual_seed(0)
        student = type(student)(student.config).eval()
    write_new_dir(out, lambda tmp: (student.save_pretrained(tmp, safe_serialization=True), tok.save_pretrained(tmp)))
    print(f"{name}: {parameters(student) / 1e6:.1f}M parameters", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-prune")
    ap.add_argument("--steps", type=int, default=16, help="healing steps per candidate")
    ap.add_argument("--samples", type=int, default=128, help="calibration examples for the importance")
    ap.add_argument("--dev", type=int, default=64, help="Dolly dev examples for the cross-entropy")
    ap.add_argument("--smoke", action="store_true", help="2 healing steps, 8 calibration and dev examples")
    a = ap.parse_args()
    steps, samples, n_dev = (2, 8, 8) if a.smoke else (a.steps, a.samples, a.dev)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    teacher, _ = prepare_models(None, 10)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from switchkd.prune import calibration_sequences, importance, parameters

    tok = AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32)
    t = time.time()
    imp = importance(model, calibration_sequences(str(DATA / "dolly" / "train.jsonl"), tok, samples, 256),
                     tok.pad_token_id, batch_size=8, progress=True)
    res: Dict[str, Any] = {"importance_s": time.time() - t, "samples": samples, "steps": steps,
                           "block_influence": [round(float(x), 4) for x in imp.blocks],
                           "teacher": {"parameters": parameters(model), "dev_ce": cached(out / "teacher-ce.json",
                                                                                         lambda: ce(teacher, n_dev))},
                           "candidates": {}}
    del model
    for name, spec in CANDIDATES.items():
        t = time.time()
        path = build(name, spec, teacher, imp, out / name)
        from switchkd.prune import parameters as count

        student = AutoModelForCausalLM.from_pretrained(str(path))
        row = {"parameters": count(student), "before": cached(out / f"{name}-ce.json", lambda: ce(path, n_dev))}
        del student
        t1 = time.time()
        healed = train_run("smollm2/heal", heal_overrides(path, teacher, steps), out / f"{name}-heal")
        row["heal_s"] = time.time() - t1
        row["after"] = cached(out / f"{name}-heal-ce.json", lambda: ce(healed, n_dev))
        row["seconds"] = time.time() - t
        res["candidates"][name] = row
        print(f"{name}: {row['parameters'] / 1e6:.1f}M, dev CE {row['before']:.2f} -> {row['after']:.2f} "
              f"({row['seconds']:.0f} s)", flush=True)
    res["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(res, indent=1))
    lines = [f"teacher: {res['teacher']['parameters'] / 1e6:.1f}M parameters, dev CE {res['teacher']['dev_ce']:.2f}; "
             f"importance from {samples} Dolly examples in {res['importance_s']:.0f} s; healing {steps} steps", "",
             "| candidate | parameters | dev CE untrained | dev CE healed |", "|---|---:|---:|---:|"]
    for name, row in res["candidates"].items():
        lines.append(f"| {name} | {row['parameters'] / 1e6:.1f}M | {row['before']:.2f} | {row['after']:.2f} |")
    lines += ["", "Block Influence per block: " + ", ".join(f"{x:.2f}" for x in res["block_influence"]),
              f"total {res['seconds'] / 60:.1f} min"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

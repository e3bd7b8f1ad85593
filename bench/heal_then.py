"""Does SFT still help after healing?  (``python bench/heal_then.py``, after ``make bench-prune``)

The README's real-model path is prune -> heal -> SFT -> method, as DistiLLM and MiniLLM start every distillation run
from a student fine-tuned on the training set.  This measures whether the SFT step still pays once the student is
a healed pruned model: from ``bench/prune.py``'s best healed candidate (``width-depth-heal``), the same method
(KD, ``configs/smollm2/kd.yaml``) for ``--steps`` steps from three starts with the same extra budget before it:

- ``heal``: the healed student as it is (no extra steps);
- ``heal+sft``: ``--steps`` SFT steps on Dolly first (``configs/smollm2/sft.yaml``);
- ``heal+heal``: ``--steps`` more healing steps first (``configs/smollm2/heal.yaml``: the same budget, no SFT).

Reported per start: Dolly dev cross-entropy per response token (64 examples) and greedy ROUGE-L on the first 64
Dolly dev prompts (chat template, at most 64 new tokens), before and after the method.

    python bench/heal_then.py [--steps 16] [--prune-out runs/bench-prune] [--out runs/bench-heal-then]
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


def rouge(model_dir: Path, n: int) -> float:
    """Greedy ROUGE-L (x100) on the first ``n`` Dolly dev prompts through the chat template."""
    from switchkd.config import DataConfig, EvalConfig, ModelConfig
    from switchkd.data import load_examples
    from switchkd.evaluate import generate_texts
    from switchkd.metrics import rouge_l
    from switchkd.models import load_model, load_tokenizer

    tok = load_tokenizer(ModelConfig(name=str(model_dir)))
    model = load_model(ModelConfig(name=str(model_dir)), tok, trainable=False)
    examples = load_examples(str(DATA / "dolly" / "dev.jsonl"), DataConfig(format="minillm", template="chat"), tok, n)
    cfg = EvalConfig(do_sample=False, max_prompt_length=128, max_length=192, max_new_tokens=64, batch_size=16)
    texts = generate_texts(model, tok, [e.prompt for e in examples], cfg, None)
    return sum(rouge_l(t, e.references) for t, e in zip(texts, examples)) / len(examples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prune-out", default="runs/bench-prune")
    ap.add_argument("--out", default="runs/bench-heal-then")
    ap.add_argument("--dev", type=int, default=64)
    a = ap.parse_args()
    healed = Path(a.prune_out) / "width-depth-heal" / "final"
    if not (healed / "config.json").is_file():
        raise SystemExit(f"{healed}: run bench/prune.py first")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    teacher, _ = prepare_models(None, 10)
    common: List[str] = [f"data.train={DATA / 'dolly' / 'train.jsonl'}", "data.dev=null", "data.max_prompt_length=128",
                         "data.max_length=256", "method.max_new_tokens=64", f"train.max_steps={a.steps}",
                         "train.warmup_steps=0", "train.save_every=0", "train.eval_every=0", "train.log_every=1",
                         "train.keep_best=false", "output.overwrite=true", f"teacher.name={teacher}"]
    starts = {"heal": healed,
              "heal+sft": train_run("smollm2/sft", common + [f"model.name={healed}"], out / "sft"),
              "heal+heal": train_run("smollm2/heal", common + [f"model.name={healed}", "train.seed=2"], out / "heal")}
    res: Dict[str, Any] = {"steps": a.steps, "dev": a.dev, "starts": {}}
    for name, start in starts.items():
        key = name.replace("+", "-")
        final = train_run("smollm2/kd", common + [f"model.name={start}"], out / f"{key}-kd")
        row = {"start_ce": cached(out / f"{key}-ce.json", lambda s=start: ce(s, a.dev)),
               "start_rouge": cached(out / f"{key}-rouge.json", lambda s=start: rouge(s, a.dev)),
               "kd_ce": cached(out / f"{key}-kd-ce.json", lambda f=final: ce(f, a.dev)),
               "kd_rouge": cached(out / f"{key}-kd-rouge.json", lambda f=final: rouge(f, a.dev))}
        res["starts"][name] = row
        print(f"{name}: dev CE {row['start_ce']:.3f} -> {row['kd_ce']:.3f} after KD; ROUGE-L {row['start_rouge']:.2f} "
              f"-> {row['kd_rouge']:.2f}", flush=True)
    res["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(res, indent=1))
    lines = [f"KD {a.steps} steps from each start; Dolly dev CE ({a.dev} examples) and greedy ROUGE-L ({a.dev} prompts)",
             "", "| start | dev CE | ROUGE-L | dev CE after KD | ROUGE-L after KD |", "|---|---:|---:|---:|---:|"]
    for name, row in res["starts"].items():
        lines.append(f"| {name} | {row['start_ce']:.3f} | {row['start_rouge']:.2f} | {row['kd_ce']:.3f} | "
                     f"{row['kd_rouge']:.2f} |")
    lines.append(f"total {res['seconds'] / 60:.1f} min")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

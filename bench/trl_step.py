"""Benchmark 2 of issue 5: a whole on-policy training step, switchkd GKD and SWITCH vs TRL.

TRL's ``DistillationTrainer`` (trl 1.16, the ``dev`` extra) samples a completion with the student
(``generate``), runs the teacher over it and trains the student on the generalized JSD (``beta``).
The same step in switchkd is GKD with ``student_ratio=1`` (every batch student-generated) and
``divergence=jsd, beta=0.5``; SWITCH is the preset's source (``switch_ratio=1``) with the same loss.
Both sides get the same tiny random GPT-2 models (teacher 6 layers d=256, student 2 layers d=128,
the real GPT-2 tokenizer from ../shared, vocab 50257), the same prompts (Dolly train prompts cut to
exactly ``--prompt`` tokens), batch, completion length (``--new-tokens``, sampled at temperature 1),
fp32, AdamW, gradient checkpointing off.  Each side runs ``--steps`` optimizer steps; the first is
a warm-up and the median of the rest is reported (wall time of the whole optimizer step: rollout,
teacher forward, student forward/backward, optimizer).  Prints one JSON line per variant and a
summary line with the two goals (TRL step >= 1.3x our GKD step; our SWITCH step <= TRL's step).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import GPT2TokenizerFast, TrainerCallback

from switchkd.config import load_config
from switchkd.data import read_records
from switchkd.train import train

SHARED = Path(__file__).resolve().parents[2] / "shared"


def prompts(tok: GPT2TokenizerFast, n: int, length: int) -> list[str]:
    """Dolly prompts cut to exactly ``length`` tokens (kept only when re-encoding gives ``length``)."""
    out = []
    for row in read_records(str(SHARED / "data/minillm_data/dolly/train.jsonl")):
        text = row["instruction"] + "\n" + (row.get("input") or "")
        ids = tok(text)["input_ids"]
        if len(ids) >= length:
            cut = tok.decode(ids[:length])
            if len(tok(cut)["input_ids"]) == length:
                out.append(cut)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} Dolly prompts have {length} tokens")


class StepTimer(TrainerCallback):
    """Wall time of each TRL optimizer step (generation included: it runs inside the step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
        self.times.append(time.perf_counter() - self.t0)


def trl_step(student: Path, teacher: Path, texts: list[str], args: argparse.Namespace, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DistillationConfig, DistillationTrainer

    tok = GPT2TokenizerFast.from_pretrained(student, padding_side="left")
    tok.pad_token = tok.eos_token
    cfg = DistillationConfig(output_dir=str(out / "trl"), per_device_train_batch_size=args.batch, max_steps=args.steps,
                             learning_rate=1e-4, max_completion_length=args.new_tokens, beta=0.5, temperature=1.0,
                             gradient_checkpointing=False, bf16=getattr(args, "bf16", False), use_cpu=not torch.cuda.is_available(),
                             report_to=[], logging_steps=10_000, save_strategy="no", seed=1, disable_dropout=True,
                             dataloader_num_workers=0)
    trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student),
                                  teacher_model=AutoModelForCausalLM.from_pretrained(
                                      teacher, dtype=torch.bfloat16 if getattr(args, "bf16", False) else torch.float32), args=cfg,
                                  train_dataset=Dataset.from_list([{"prompt": t} for t in texts]),
                                  processing_class=tok)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return {"step_s": timer.times}


def ours(student: Path, teacher: Path, data: Path, method: list[str], args: argparse.Namespace, out: Path) -> dict:
    run = out / ("switchkd-" + "_".join(m.split("=")[1] for m in method if not m.startswith("method.source")))
    (run / "metrics.jsonl").unlink(missing_ok=True)
    cfg = load_config(None, [f"model.name={student}", f"teacher.name={teacher}", f"data.train={data}",
                             "data.template=none", "data.dev=null", f"data.max_prompt_length={args.prompt}",
                             f"data.max_length={args.prompt + args.new_tokens}", f"method.max_new_tokens={args.new_tokens}",
                             "method.divergence=jsd", "method.params.beta=0.5", "method.decoding.temperature=1.0",
                             f"train.batch_size={args.batch}", f"train.max_steps={args.steps}", "train.lr=1e-4",
                             "train.warmup_steps=0", "train.log_every=1", "train.keep_best=false",
                             f"train.loss_chunk={args.loss_chunk}", f"output.dir={run}", "output.overwrite=true", *method])
    train(cfg)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    share = [r["switch/teacher_frac"] for r in recs if "switch/teacher_frac" in r]
    return {"step_s": [r["step_s"] for r in recs], "response_tokens": [r["response_tokens"] for r in recs]} | (
        {"teacher_share": statistics.fmean(share)} if share else {})


def tau_for_shares(student: Path, teacher: Path, texts: list[str], args: argparse.Namespace) -> dict:
    """Constant tau0 giving about each ``--shares`` teacher-written share: quantiles of the JSD gate
    on a student-only probe (tau0 = inf) of the first batch."""
    from transformers import AutoModelForCausalLM

    from switchkd.rollout import Gate, RolloutConfig, rollout

    tok = GPT2TokenizerFast.from_pretrained(student)
    s, t = (AutoModelForCausalLM.from_pretrained(m).eval() for m in (student, teacher))
    ids = torch.tensor([tok(x)["input_ids"] for x in texts[:args.batch]])
    probe = rollout(s, t, ids, torch.ones_like(ids), RolloutConfig(
        speculative=False, max_new_tokens=args.new_tokens, seed=0,
        eos_token_id=[tok.eos_token_id], pad_token_id=tok.eos_token_id), Gate(tau0=float("inf")))
    gates = probe.gate[probe.response_mask]
    return {share: float(gates.quantile(1 - share)) for share in args.shares}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--loss-chunk", type=int, default=0, help="switchkd's train.loss_chunk (0: whole logits)")
    p.add_argument("--shares", type=float, nargs="*", default=[0.1, 0.53],
                   help="extra SWITCH variants: constant tau0 set for about these teacher-written shares")
    p.add_argument("--out", default="runs/bench-trl")
    args = p.parse_args()
    out = Path(args.out)
    from epoch import gpt2_pair  # the same tiny random GPT-2 models as benchmark 3

    tok, teacher, student = gpt2_pair(out)
    texts = prompts(tok, args.batch * args.steps, args.prompt)
    data = out / "prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": t, "output": "unused"}) + "\n" for t in texts))
    variants = {"trl DistillationTrainer (on-policy, JSD beta 0.5)": lambda: trl_step(student, teacher, texts, args, out),
                "switchkd gkd (student_ratio 1, JSD beta 0.5)": lambda: ours(
                    student, teacher, data, ["method.name=gkd", "method.source=mixture", "method.mixture.student_ratio=1.0"], args, out),
                "switchkd switch (preset gate, JSD beta 0.5 loss)": lambda: ours(
                    student, teacher, data, ["method.name=switch", "method.source=switch", "method.switch.ratio=1.0"], args, out)}
    for share, tau in tau_for_shares(student, teacher, texts, args).items():
        variants[f"switchkd switch (const tau0 {tau:.4f}, target share {share})"] = (
            lambda tau=tau: ours(student, teacher, data, ["method.name=switch", "method.source=switch",
                                                          "method.switch.ratio=1.0", "method.switch.schedule=const",
                                                          f"method.switch.tau0={tau}"], args, out))
    med = {}
    for name, fn in variants.items():
        res = fn()
        med[name] = statistics.median(res["step_s"][1:]) if len(res["step_s"]) > 1 else res["step_s"][0]
        print(json.dumps({"variant": name, "median_step_s": round(med[name], 3),
                          "steps_s": [round(t, 3) for t in res["step_s"]]} |
                         {k: v for k, v in res.items() if k != "step_s"}), flush=True)
    trl, gkd, *switch = med.values()
    print(json.dumps({"summary": "on-policy step", "trl_over_gkd": round(trl / gkd, 2), "goal_trl_over_gkd": 1.3,
                      "switch_over_trl": [round(x / trl, 2) for x in switch], "goal_switch_over_trl": 1.0,
                      "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()

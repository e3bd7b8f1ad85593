"""The GPU benchmark (issues 10 and 11): rollouts, a whole training step against TRL, peak memory.

Run on a CUDA machine (at most ~8 minutes on an H100 at the defaults):
    python3 bench/gpu.py --out runs/bench-gpu            # prints JSON lines, then markdown tables
Shapes: random-init GPT-2-XL-shaped teacher (48 x 1600, 1.56B) and GPT-2-small-shaped student
(12 x 768, 124M), vocab 50257 (the GPT-2 tokenizer from ../shared), bf16, prompt 64 tokens,
256 new tokens, EOS disabled, greedy.

1. Rollouts for B = 1, 8, 32: lockstep SWITCH (static caches + compiled step when ``--compile``),
   speculative SWITCH (per-row acceptance), at ~10% and ~53% teacher share (tau0 by bisection on
   the measured share at B = 8; the share at each B is reported), and the floor = Hugging Face
   ``generate`` of the student with ``cache_implementation="static"`` (compiled) plus one teacher
   forward over the result.  ms per generated step and the ratio to the weight-read floor (both
   models' weight bytes / ``--bandwidth``).
2. One whole on-policy training step (rollout, teacher forward, student forward/backward, AdamW)
   of switchkd GKD and SWITCH against TRL's ``DistillationTrainer``, same models and prompts, bf16
   autocast (``--skip-trl`` without trl).
3. Peak GPU memory of a KD and a SWITCH step, full fine-tuning vs LoRA, with and without
   ``train.loss_chunk``.

``--smoke`` runs tiny shapes on the CPU in seconds (it checks the script, not the speed).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from epoch import SHARED, save_model  # noqa: E402

from switchkd.calibrate import calibrate_tau0  # noqa: E402
from switchkd.rollout import Gate, RolloutConfig, rollout  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def load(path: Path, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def rollouts(args: argparse.Namespace, tok, teacher_dir: Path, student_dir: Path) -> list[dict]:
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    t, s = load(teacher_dir, args.device, dtype), load(student_dir, args.device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for m in (t, s) for p in m.parameters())
    floor_step = weight_bytes / args.bandwidth
    V, n = len(tok), args.new_tokens
    base = RolloutConfig(max_new_tokens=n, do_sample=False, eos_token_id=[V + 1], pad_token_id=0, vocab_size=V,
                         compile=args.compile)
    gate = Gate(decay=0.0, schedule="const")
    g = torch.Generator().manual_seed(0)
    ids8 = torch.randint(3, V, (8, args.prompt), generator=g).to(args.device)
    taus = {share: calibrate_tau0(s, t, ids8, torch.ones_like(ids8), replace(base, speculative=True), gate, share,
                                  iters=args.bisect)[0] for share in args.shares}
    rows = []
    for B in args.batches:
        ids = torch.randint(3, V, (B, args.prompt), generator=g).to(args.device)
        mask = torch.ones_like(ids)

        def floor():
            seq = s.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, cache_implementation="static")
            with torch.no_grad():
                t(input_ids=seq, logits_to_keep=1)

        t_floor = timed(floor, args.device, args.repeats)
        for share, tau0 in taus.items():
            row = {"batch": B, "target_share": share, "tau0": tau0}
            for name, spec in (("lockstep", False), ("speculative", True)):
                cfg, rule = replace(base, speculative=spec), replace(gate, tau0=tau0)
                out = rollout(s, t, ids, mask, cfg, rule)
                sec = timed(lambda: rollout(s, t, ids, mask, cfg, rule), args.device, args.repeats)
                row |= {f"{name}_ms_per_step": round(1000 * sec / n, 2),
                        f"{name}_over_weight_floor": round(sec / n / floor_step, 1),
                        f"{name}_teacher_forwards_per_token": round(out.forwards["teacher"] / n, 3)}
                row["teacher_share"] = round(float(out.from_teacher.float().mean()), 3)
            row |= {"static_floor_ms_per_step": round(1000 * t_floor / n, 2),
                    "weight_floor_ms_per_step": round(1000 * floor_step, 3),
                    "speculative_over_static_floor": round(row["speculative_ms_per_step"] / (1000 * t_floor / n), 2),
                    "lockstep_over_speculative": round(row["lockstep_ms_per_step"] / row["speculative_ms_per_step"], 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def train_steps(args: argparse.Namespace, tok, teacher_dir: Path, student_dir: Path, out: Path) -> dict:
    import trl_step

    a = argparse.Namespace(batch=8, prompt=args.prompt, new_tokens=args.new_tokens, steps=args.steps, loss_chunk=0,
                           bf16=args.device == "cuda")
    texts = trl_step.prompts(tok, a.batch * a.steps, a.prompt)
    data = out / "prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": x, "output": "unused"}) + "\n" for x in texts))
    prec = ["train.mixed_precision=bf16", "teacher.dtype=bfloat16"] if a.bf16 else []
    variants = {"switchkd gkd": ["method.name=gkd", "method.source=mixture", "method.divergence=jsd",
                                 "method.mixture.student_ratio=1.0", *prec],
                "switchkd switch (preset)": ["method.name=switch", "method.source=switch", "method.divergence=jsd",
                                             "method.switch.ratio=1.0", *prec]}
    if not args.skip_trl:
        variants = {"trl DistillationTrainer": None} | variants
    med = {}
    for name, method in variants.items():
        res = (trl_step.trl_step(student_dir, teacher_dir, texts, a, out) if method is None
               else trl_step.ours(student_dir, teacher_dir, data, method, a, out))
        med[name] = statistics.median(res["step_s"][1:]) if len(res["step_s"]) > 1 else res["step_s"][0]
        print(json.dumps({"variant": name, "median_step_s": round(med[name], 3)} |
                         {k: v for k, v in res.items() if k != "step_s"}), flush=True)
    return med


def memory(args: argparse.Namespace, teacher_dir: Path, student_dir: Path, out: Path) -> list[dict]:
    """Peak memory of a 2-step KD and SWITCH run per setting (CUDA only: needs max_memory_allocated)."""
    from switchkd.config import load_config
    from switchkd.train import train

    data = out / "prompts.jsonl"
    rows = []
    for method in (["method.name=kd", "method.divergence=fkl"], ["method.name=switch", "method.source=switch", "method.divergence=srkl"]):
        for lora in (False, True):
            for chunk in (0, 256):
                torch.cuda.reset_peak_memory_stats()
                cfg = load_config(None, [f"model.name={student_dir}", f"teacher.name={teacher_dir}",
                                         f"data.train={data}", "data.template=none", "data.dev=null",
                                         f"data.max_length={args.prompt + args.new_tokens}", "data.max_prompt_length=64",
                                         f"method.max_new_tokens={args.new_tokens}", "train.batch_size=8",
                                         "train.max_steps=2", "train.mixed_precision=bf16", "teacher.dtype=bfloat16",
                                         f"train.loss_chunk={chunk}", "train.keep_best=false", "train.log_every=1",
                                         f"output.dir={out / 'mem'}", "output.overwrite=true", *method,
                                         *(["model.lora.r=16"] if lora else [])])
                train(cfg)
                row = {"method": method[0].split("=")[1], "lora": lora, "loss_chunk": chunk,
                       "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] +
                     ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--shares", type=float, nargs="+", default=[0.10, 0.53])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--bisect", type=int, default=8, help="bisection steps of the tau0 calibration")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per training variant (first = warm-up)")
    p.add_argument("--bandwidth", type=float, default=3.35e12, help="memory bandwidth, bytes/s (H100 SXM: 3.35e12)")
    p.add_argument("--compile", default="auto", help="lockstep's static/compiled path: auto | true | false")
    p.add_argument("--skip", nargs="*", default=[], choices=["rollout", "train", "memory"])
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    p.add_argument("--out", default="runs/bench-gpu")
    args = p.parse_args()
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(SHARED / "data/gpt2_tokenizer")
    out = Path(args.out)
    shapes = ((2, 64), (1, 32)) if args.smoke else ((48, 1600), (12, 768))
    if args.smoke:
        args.batches, args.new_tokens, args.repeats, args.bisect, args.steps = [1, 2], 8, 1, 2, 2
    teacher_dir = save_model(out / f"teacher-{shapes[0][0]}x{shapes[0][1]}", *shapes[0], 1, tok)
    student_dir = save_model(out / f"student-{shapes[1][0]}x{shapes[1][1]}", *shapes[1], 2, tok)
    t0, report = time.perf_counter(), {}
    if "rollout" not in args.skip:
        report["rollout"] = rollouts(args, tok, teacher_dir, student_dir)
    if "train" not in args.skip:
        report["train_step_s"] = train_steps(args, tok, teacher_dir, student_dir, out)
    if "memory" not in args.skip and args.device == "cuda":
        report["memory"] = memory(args, teacher_dir, student_dir, out)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or platform.machine()
    print(json.dumps({"summary": "gpu benchmark", "device": device, "torch": torch.__version__,
                      "seconds": round(time.perf_counter() - t0, 1)}))
    if report.get("rollout"):
        print("\n" + table(report["rollout"]))
    if report.get("train_step_s"):
        print("\n" + table([{"variant": k, "median step s": round(v, 3)} for k, v in report["train_step_s"].items()]))
    if report.get("memory"):
        print("\n" + table(report["memory"]))


if __name__ == "__main__":
    main()

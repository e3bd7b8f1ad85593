"""vLLM on the real pair: student rollouts on vLLM against switchkd's engine, a teacher on a vLLM server against the
teacher in the process.  (``make bench-vllm``)

SmolLM2-135M-Instruct (GGUF from PyPI, converted) and the student the README's path builds (its 10-block cut,
SFT'd on Dolly: ``bench/real.py``'s ``sft-init``, built here if missing).  Every run trains the same number of
optimizer steps from ``sft-init`` with the ``configs/smollm2`` preset as it is plus the two keys:

- rollouts: GKD and DistiLLM with ``method.decoding.engine`` switchkd and vllm (DistiLLM with its student
  probability starting at 0.5 instead of 0, so that a short run rolls out at all);
- teacher: KD, SeqKD, GKD and DistiLLM with the teacher in the process and on ``switchkd serve-teacher`` (fp32,
  top 20);
- two writers: MiniLLM and SWITCH on switchkd's engine, with vLLM drafts (``switchkd.drafted``) and with vLLM
  drafts against the served teacher.

How often SWITCH's gate over the served top 20 + tail agrees with the exact gate: on the student's greedy
responses to 32 Dolly dev prompts, per response position, the exact JSD (the teacher in the process) and the
bucketed JSD (the server's top 20), and the decisions both give at the preset's tau_t (tau0 3.28, decay 0.1) and at the
constant tau where the exact gate has the teacher write 53% of the tokens (the preset's decay makes the gate a
position cut-off on this pair: no tau0 reaches 53% there).

Reported per run: seconds per optimizer step (mean over the steps after the first), the part of it spent making
the step's sequences (``sequences_s``: rollouts, teacher samples), and the student's dev cross-entropy on 64 Dolly
dev examples after training.  A direct probe times 8 prompts x 64 sampled tokens on switchkd's engine, on the
in-process vLLM engine and on the server.  Each training run is its own process (vLLM in the process).

    python bench/vllm.py [--steps 16] [--out runs/bench-vllm] [--smoke] [--runs kd,kd-server,...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from real import DATA, SETTINGS, SMOKE, cached, common, dev_ce, method_overrides, prepare_models, train_run  # noqa: E402

TOP_K = 20
RUNS = {  # name -> (preset, extra overrides); "{server}" is replaced by the teacher server's URL
    "gkd": ("smollm2/gkd", []),
    "gkd-vllm": ("smollm2/gkd", ["method.decoding.engine=vllm"]),
    "gkd-server": ("smollm2/gkd", ["teacher.server={server}"]),
    "gkd-vllm-server": ("smollm2/gkd", ["method.decoding.engine=vllm", "teacher.server={server}"]),
    "distillm": ("smollm2/distillm", ["method.distillm.init_student_prob=0.5"]),
    "distillm-vllm": ("smollm2/distillm", ["method.distillm.init_student_prob=0.5", "method.decoding.engine=vllm"]),
    "distillm-server": ("smollm2/distillm", ["method.distillm.init_student_prob=0.5", "teacher.server={server}"]),
    "kd": ("smollm2/kd", []),
    "kd-server": ("smollm2/kd", ["teacher.server={server}"]),
    "seqkd": ("smollm2/seqkd", []),
    "seqkd-server": ("smollm2/seqkd", ["teacher.server={server}"]),
    "minillm": ("smollm2/minillm", []),
    "minillm-vllm": ("smollm2/minillm", ["method.decoding.engine=vllm"]),
    "minillm-vllm-server": ("smollm2/minillm", ["method.decoding.engine=vllm", "teacher.server={server}"]),
    "switch": ("smollm2/switch", []),
    "switch-vllm": ("smollm2/switch", ["method.decoding.engine=vllm"]),
    "switch-vllm-server": ("smollm2/switch", ["method.decoding.engine=vllm", "teacher.server={server}"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(teacher: Path, log: Path) -> tuple:
    """``switchkd serve-teacher`` on a free port; ``(process, url, seconds until it answered)``."""
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "switchkd", "serve-teacher", str(teacher), "--port", str(port),
                             "--dtype", "float32", "--max-logprobs", str(TOP_K), "--max-model-len", "1024"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return proc, url, time.time() - t0
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the teacher server exited; see {log}")


def train(preset: str, overrides: List[str], out: Path) -> None:
    """``switchkd train`` in its own process (reused when finished)."""
    if (out / "final" / "config.json").is_file():
        return
    cmd = [sys.executable, "-m", "switchkd", "train", preset, *overrides, f"output.dir={out}"]
    subprocess.run(cmd, check=True, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"), stdout=subprocess.DEVNULL)


def step_times(run: Path) -> Dict[str, float]:
    """Mean seconds per step and per step's sequences, the first step (engine start-up) left out."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "step_s" in r]
    later = rows[1:] or rows
    return {"step_s": statistics.fmean(r["step_s"] for r in later),
            "sequences_s": statistics.fmean(r.get("sequences_s", 0.0) for r in later),
            "first_step_s": rows[0]["step_s"], "steps": len(rows)}


def run_script(script: str) -> Dict[str, Any]:
    """Run ``script`` (Python printing one JSON line last) in a fresh process (vLLM in it); its JSON."""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def probe(student: Path, url: str, teacher: Path, n_prompts: int = 8, new_tokens: int = 64) -> Dict[str, float]:
    """Seconds to sample ``new_tokens`` for ``n_prompts`` Dolly prompts: switchkd's engine (the student), the
    in-process vLLM engine (the student), the server (the teacher), and switchkd's engine on the teacher."""
    script = f'''
import json, os, time, torch
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from switchkd.config import DataConfig, DecodingConfig, ModelConfig
from switchkd.data import build_batch, load_examples, tokenize
from switchkd.models import load_model, load_tokenizer
from switchkd.rollout import RolloutConfig, StudentWrites, rollout
from switchkd.served import ServedTeacher
from switchkd.vllm_engine import VLLMStudent
tok = load_tokenizer(ModelConfig(name="{student}"))
items, _ = tokenize(load_examples("{DATA / 'dolly' / 'dev.jsonl'}", DataConfig(format="minillm", template="chat"), tok,
                    {n_prompts}), tok, 128, 256, "none")
prompts = [x.prompt for x in items]
b = build_batch(prompts, [[] for _ in prompts], tok.pad_token_id, list(range(len(prompts))))
res = {{}}
for name, path in (("switchkd_student", "{student}"), ("switchkd_teacher", "{teacher}")):
    model = load_model(ModelConfig(name=path), tok, trainable=False)
    cfg = RolloutConfig(max_new_tokens={new_tokens}, seed=1, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, vocab_size=len(tok))
    rollout(model, None, b.prompt_ids[:1], b.prompt_mask[:1], cfg, StudentWrites())  # warm-up
    t = time.perf_counter(); rollout(model, None, b.prompt_ids, b.prompt_mask, cfg, StudentWrites()); res[name] = time.perf_counter() - t
student = load_model(ModelConfig(name="{student}"), tok, trainable=False)
t = time.perf_counter(); engine = VLLMStudent(student, tok, 512, seed=0); res["vllm_start"] = time.perf_counter() - t
engine.sample(prompts[:1], 4, DecodingConfig(), tok.eos_token_id, seed=0)  # warm-up
t = time.perf_counter(); engine.sample(prompts, {new_tokens}, DecodingConfig(), tok.eos_token_id, seed=1)
res["vllm_student"] = time.perf_counter() - t
served = ServedTeacher("{url}", tok, {TOP_K}); served.check(len(tok))
t = time.perf_counter(); served.sample(prompts, {new_tokens}, DecodingConfig(), tok.eos_token_id, seed=1)
res["server_teacher"] = time.perf_counter() - t
print(json.dumps(res))
'''
    return run_script(script)


def agreement(student: Path, url: str, teacher: Path, tau0: float, decay: float, n_prompts: int = 32,
              new_tokens: int = 128) -> Dict[str, Any]:
    """SWITCH's JSD gate over the served top k + tail against the exact gate, per response position of the
    student's greedy responses to ``n_prompts`` Dolly dev prompts."""
    script = f'''
import json, math, torch
from switchkd.config import DataConfig, ModelConfig
from switchkd.data import build_batch, load_examples, tokenize
from switchkd.divergences import TopKTail, jsd, with_tail
from switchkd.models import load_model, load_tokenizer
from switchkd.rollout import RolloutConfig, StudentWrites, rollout
from switchkd.served import ServedTeacher
tok = load_tokenizer(ModelConfig(name="{student}"))
items, _ = tokenize(load_examples("{DATA / 'dolly' / 'dev.jsonl'}", DataConfig(format="minillm", template="chat"), tok,
                    {n_prompts}), tok, 128, 256, "none")
prompts = [x.prompt for x in items]
b = build_batch(prompts, [[] for _ in prompts], tok.pad_token_id, list(range(len(prompts))))
student = load_model(ModelConfig(name="{student}"), tok, trainable=False)
teacher = load_model(ModelConfig(name="{teacher}"), tok, trainable=False)
cfg = RolloutConfig(max_new_tokens={new_tokens}, do_sample=False, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, vocab_size=len(tok))
responses = []
for i in range(0, len(prompts), 8):
    out = rollout(student, None, b.prompt_ids[i:i + 8], b.prompt_mask[i:i + 8], cfg, StudentWrites())
    responses += out.responses(b.prompt_ids.shape[1])
served = ServedTeacher("{url}", tok, {TOP_K}); served.check(len(tok))
rows = served.logprobs([p + r for p, r in zip(prompts, responses)])
exact, bucket, pos = [], [], []
with torch.no_grad():
    for p, r, row in zip(prompts, responses, rows):
        seq = torch.tensor([p + r])
        q = student(seq).logits[0, len(p) - 1:-1, :len(tok)].float()
        t = teacher(seq).logits[0, len(p) - 1:-1, :len(tok)].float()
        exact += jsd(q, t, beta=0.5).tolist()
        top = TopKTail(torch.tensor(row.logp[len(p):]), torch.tensor(row.ids[len(p):]), len(tok))
        lq, lp = with_tail(q, top)
        bucket += jsd(lq, lp, beta=0.5).tolist()
        pos += list(range(len(r)))
exact, bucket, pos = torch.tensor(exact), torch.tensor(bucket), torch.tensor(pos, dtype=torch.float64)
def decisions(tau0, decay):
    tau = tau0 * torch.exp(-decay * pos)
    return exact > tau, bucket > tau
lo, hi = 0.0, 1.0
for _ in range(40):  # a constant tau where the exact gate has the teacher write 53% of the positions (JSD <= ln 2)
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if float(decisions(mid, 0.0)[0].float().mean()) > 0.53 else (lo, mid)
res = {{"positions": len(pos), "responses": len(responses), "ratio_mean": float((bucket / exact.clamp(min=1e-12)).mean()),
       "exact_mean": float(exact.mean()), "bucket_mean": float(bucket.mean())}}
for name, tau0, decay in (("preset", {tau0}, {decay}), ("share53", hi, 0.0)):
    res[name + "_decay"] = decay
    e, s = decisions(tau0, decay)
    res[name] = {{"tau0": tau0, "agree": float((e == s).float().mean()), "exact_share": float(e.float().mean()),
                 "served_share": float(s.float().mean()),
                 "first_teacher_same": float(sum(int(torch.equal(a.nonzero()[:1], c.nonzero()[:1]))
                                            for a, c in zip(e.split([len(r) for r in responses]),
                                                            s.split([len(r) for r in responses]))) / len(responses))}}
print(json.dumps(res))
'''
    return run_script(script)


def report(res: Dict[str, Any], out: Path) -> str:
    lines = [f"steps per run: {res['steps']}, batch {res['batch']}; server ready after {res['server_start_s']:.0f} s", "",
             "| run | s / step | sequences s / step | first step s | dev CE |", "|---|---:|---:|---:|---:|"]
    for name, r in res["runs"].items():
        lines.append(f"| {name} | {r['step_s']:.1f} | {r['sequences_s']:.1f} | {r['first_step_s']:.1f} | "
                     f"{r['dev_ce']:.3f} |")
    lines += ["", f"dev CE of sft-init: {res['sft_init_dev_ce']:.3f}", "", "probe (seconds): " +
              ", ".join(f"{k} {v:.2f}" for k, v in res["probe"].items())]
    g = res.get("agreement")
    if g:
        lines += ["", f"served gate vs exact gate over {g['positions']} positions of {g['responses']} responses: mean JSD "
                  f"exact {g['exact_mean']:.4f}, top-{TOP_K} + tail {g['bucket_mean']:.4f} (mean ratio {g['ratio_mean']:.3f})"]
        for name in ("preset", "share53"):
            d = g[name]
            lines.append(f"- tau0 {d['tau0']:.3f}, decay {g.get(name + '_decay', 0.1)} ({name}): decisions agree at {100 * d['agree']:.1f}% of positions; "
                         f"teacher share exact {100 * d['exact_share']:.1f}%, served {100 * d['served_share']:.1f}%; "
                         f"same first teacher position in {100 * d['first_teacher_same']:.0f}% of responses")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-vllm")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--smoke", action="store_true", help="2 steps, batch 2, short responses")
    ap.add_argument("--dev", type=int, default=64, help="Dolly dev examples for the dev CE")
    a = ap.parse_args()
    s = SMOKE if a.smoke else SETTINGS["cpu"]
    steps = 2 if a.smoke else a.steps
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    teacher, init = prepare_models(None, s.layers)
    base = common(s, "cpu") + [f"teacher.name={teacher}", f"teacher.top_k={TOP_K}"]
    sft_init = train_run("smollm2/sft", common(s, "cpu") + [f"model.name={init}", f"train.max_steps={s.init_steps}",
                                                            f"train.lr={s.init_lr}", "data.dev=null"], out / "sft-init")
    proc, url, started = start_server(teacher, out / "server.log")
    res: Dict[str, Any] = {"steps": steps, "batch": s.batch, "server_start_s": started, "runs": {}}
    try:
        res["sft_init_dev_ce"] = cached(out / "sft-init-dev.json", lambda: dev_ce(sft_init, a.dev))
        res["probe"] = cached(out / "probe.json", lambda: probe(sft_init, url, teacher))
        res["agreement"] = cached(out / "agreement.json", lambda: agreement(sft_init, url, teacher, 3.28, 0.1))
        print("gate agreement:", json.dumps(res["agreement"]), flush=True)
        for name in [r for r in a.runs.split(",") if r]:
            preset, extra = RUNS[name]
            method = preset.split("/")[1]
            own = method_overrides(method, s, 3.28)  # (3.28: the preset's tau0, calibrated on this pair)
            dev = [] if method == "distillm" else ["data.dev=null"]  # DistiLLM's schedule reads its dev CE
            t1 = time.time()
            train(preset, base + [f"model.name={sft_init}", f"train.max_steps={steps}", *dev, *own]
                  + [x.format(server=url) for x in extra], out / name)
            r = step_times(out / name)
            r["dev_ce"] = cached(out / name / "dev_ce.json", lambda n=name: dev_ce(out / n / "final", a.dev))
            res["runs"][name] = r
            print(f"{name}: {r['step_s']:.1f} s/step ({r['sequences_s']:.1f} s sequences), dev CE {r['dev_ce']:.3f}, "
                  f"{time.time() - t1:.0f} s", flush=True)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait()
    res["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(report(res, out))
    print(f"bench/vllm.py: done in {res['seconds'] / 60:.1f} min; {out / 'results.json'}")


if __name__ == "__main__":
    main()

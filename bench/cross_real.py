"""The real pair across vocabularies: SmolLM2-135M-Instruct into a GPT-2-BPE student (``python
bench/cross_tokenizer.py --pair real``; the steps are described in that script's docstring).

Reuses ``bench/real.py``'s teacher (the GGUF file converted), cut, budget (``--setting cpu``: 50 SFT steps
for ``sft-init``, 16 steps × 8 per method, 64 new tokens, 30 prompts per set, one sampling seed) and scoring.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

import real  # bench/real.py
from cross_tokenizer import SHARED, transplant

from switchkd.config import load_config

METHODS = ("sft", "kd", "seqkd", "gkd", "switch")
GATES = ("byte", "shared", "sorted")
CROSS = ["train.loss_chunk=0", "method.cross_tokenizer=gold"]  # (the chunked head works on one vocabulary)
CALIB_ITERS = 6  # bisection steps of each gate's calibration (after the bracket): the share to a few percent
CONST_SHARE = 0.25  # the teacher share of the gate study (a constant threshold: the gate alone decides)
STUDY_PROMPTS = 32  # Dolly dev prompts after the calibration's, for the gate study


def study_rollouts(teacher: Path, student: Path, s: Any, gate: str, tau0: float, device: str,
                   extra: List[str] = ()) -> Dict[str, Any]:
    """ROUGE-L and teacher share of greedy SWITCH rollouts (cross gate ``gate`` at ``tau0``; ``random``: the teacher
    writes each step with probability ``tau0``) on Dolly dev prompts after the calibration's."""
    import torch

    from switchkd.batch import left_pad
    from switchkd.calibrate import _cross_view
    from switchkd.data import load_examples, tokenize
    from switchkd.interleave import Vocab, cross_switch
    from switchkd.methods import source_class
    from switchkd.metrics import rouge_l
    from switchkd.models import load_pair
    from switchkd.rollout import from_method
    from switchkd.rules import Mixture

    kind = "byte" if gate == "random" else gate
    cfg = _config(teacher, student, s, device, [f"method.switch.cross_gate={kind}", f"method.switch.tau0={tau0}",
                                                *extra])
    view = _cross_view(cfg)
    model, t_model, tok, vocab = load_pair(cfg.model, cfg.teacher, cross=True)
    model.to(device).eval()
    t_model.to(device)
    examples = load_examples(cfg.data.dev, cfg.data, tok, s.calib_prompts + STUDY_PROMPTS)[s.calib_prompts:]
    items, _ = tokenize(examples, tok, cfg.data.max_prompt_length, cfg.data.max_length, "none", view.t_tok)
    vocabs = Vocab(view.s_tok, view.s_table), Vocab(view.t_tok, view.t_table)
    scores, teacher_n, n = [], 0, 0
    for i in range(0, len(items), 8):
        part = items[i:i + 8]
        ids, mask = (x.to(device) for x in left_pad([x.prompt for x in part], tok.pad_token_id))
        t_ids, t_mask = (x.to(device) for x in left_pad([x.teacher_prompt for x in part], view.t_tok.pad_token_id))
        source = source_class(cfg.method.source)
        rcfg, rule = from_method(cfg.method, s.new_tokens, tok, vocab, **source.engine_settings(cfg)), source.rule(cfg)
        if gate == "random":  # the control: a writer drawn per step, whatever the models say
            rcfg, rule = replace(rcfg, seed=i), Mixture(alpha=tau0)
        with torch.no_grad():
            out = cross_switch(model, t_model, ids, mask, t_ids, t_mask, rcfg, rule, *vocabs, kind=kind,
                               shared=(view.s_matched, view.t_matched), t_max_len=s.max_length)
        for x, r in zip(part, out.responses(ids.shape[1])):
            scores.append(rouge_l(tok.decode(r, skip_special_tokens=True), examples[x.index].references))
        teacher_n += int(out.from_teacher[out.response_mask].sum())
        n += int(out.response_mask.sum())
    return {"rougeL": statistics.fmean(scores), "se": statistics.stdev(scores) / len(scores) ** 0.5,
            "share": teacher_n / max(n, 1), "per_prompt": scores}


def _config(teacher: Path, student: Path, s: Any, device: str, extra: List[str]) -> Any:
    """The SWITCH preset across vocabularies with greedy rollouts (the gate study's setting)."""
    return load_config(str(real.ROOT / "configs" / "smollm2" / "switch.yaml"), real.common(s, device) + CROSS + [
        f"model.name={student}", f"teacher.name={teacher}", "method.decoding.do_sample=false", *extra])


def gate_study(teacher: Path, student: Path, s: Any, device: str, out: Path) -> Dict[str, Any]:
    """Which cross gate finds where the teacher should write: each gate at a constant threshold calibrated to the
    same teacher share (``CONST_SHARE``, on the first Dolly dev prompts), its greedy rollouts of the next
    ``STUDY_PROMPTS`` prompts scored by ROUGE-L, and compared prompt by prompt with a control that draws the writer
    at random with that share (a gate that places the teacher's tokens well beats it)."""
    from switchkd.calibrate import calibrate_config

    res: Dict[str, Any] = {}
    const = ["method.switch.schedule=const", "method.switch.decay=0.0"]
    for gate in GATES:
        def one(gate: str = gate) -> Dict[str, Any]:
            cfg = _config(teacher, student, s, device, [f"method.switch.cross_gate={gate}", *const])
            tau0, share = calibrate_config(cfg, CONST_SHARE, s.calib_prompts, s.calib_prompts,
                                           log=lambda x: print(f"{gate}: {x}", flush=True), iters=CALIB_ITERS)
            return {"tau0": tau0, "calib_share": share} | study_rollouts(teacher, student, s, gate, tau0, device, const)
        res[gate] = real.cached(out / "gates-const" / f"{gate}.json", one)
    res["random"] = real.cached(out / "gates-const" / "random.json", lambda: {"tau0": CONST_SHARE} | study_rollouts(
        teacher, student, s, "random", CONST_SHARE, device))
    for gate, r in res.items():
        diff = [a - b for a, b in zip(r["per_prompt"], res["random"]["per_prompt"])]
        r["vs_random"] = (statistics.fmean(diff), statistics.stdev(diff) / len(diff) ** 0.5)
        print(f"gate {gate}: tau0 {r['tau0']:.4g}, share {r['share']:.2f}, ROUGE-L {r['rougeL']:.2f} ± {r['se']:.2f}, "
              f"minus random {r['vs_random'][0]:+.2f} ± {r['vs_random'][1]:.2f}", flush=True)
    return res


def train_calibration(teacher: Path, student: Path, s: Any, device: str, out: Path, gate: str) -> Dict[str, Any]:
    """The chosen gate's tau0 for SWITCH's training setting (the preset's exponential schedule, ``s.target`` share)."""
    from switchkd.calibrate import calibrate_config

    def one() -> Dict[str, Any]:
        cfg = _config(teacher, student, s, device, [f"method.switch.cross_gate={gate}"])
        tau0, share = calibrate_config(cfg, s.target, s.calib_prompts, s.calib_prompts,
                                       log=lambda x: print(f"{gate}: {x}", flush=True), iters=CALIB_ITERS)
        return {"tau0": tau0, "share": share}
    c = real.cached(out / "gates" / f"{gate}.json", one)
    return {"tau0": c["tau0"], "share": c.get("share", c.get("calib_share"))}


def main(a: Any) -> None:
    s = real.SMOKE if a.smoke else real.SETTINGS["cpu"]
    device = "cpu"
    out = Path(a.out or "runs/bench-cross-real")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    teacher, cut = real.prepare_models(None, s.layers)
    init = transplant(cut, SHARED / "data" / "gpt2_tokenizer", real.cache() / f"smollm2-student-{s.layers}-gpt2")
    base = real.common(s, device) + CROSS
    res: Dict[str, Any] = {"setting": real.asdict(s), "scores": {}, "metrics": {}}
    sft_init = real.train_run("smollm2/sft", base + [f"model.name={init}", f"train.max_steps={s.init_steps}",
                                                     f"train.lr={s.init_lr}", "data.dev=null"], out / "sft-init")
    res["gates"] = gate_study(teacher, sft_init, s, device, out)
    best = max(GATES, key=lambda g: res["gates"][g]["vs_random"][0])
    res["gate"], res["calibration"] = best, train_calibration(teacher, sft_init, s, device, out, best)
    for name, path in (("teacher", teacher), ("init", init), ("sft-init", sft_init)):
        res["scores"][name] = real.cached(out / "scores" / f"{name}.json", lambda p=path: real.score(p, s, device))
    for m in METHODS:
        t1 = time.time()
        extra = {"switch": [f"method.switch.cross_gate={best}", f"method.switch.tau0={res['calibration']['tau0']}"]}
        tag = f"switch-{best}" if m == "switch" else m
        final = real.train_run(f"smollm2/{m}", base + [f"model.name={sft_init}", f"teacher.name={teacher}",
                               f"train.max_steps={s.steps}"] + extra.get(m, []), out / tag)
        print(f"{tag}: trained in {time.time() - t1:.0f} s", flush=True)
        res["metrics"][m] = real.run_metrics(out / tag)
        res["scores"][m] = real.cached(out / "scores" / f"{tag}.json", lambda f=final: real.score(f, s, device))
    res["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(report(res))
    (out / "report.md").write_text(report(res))


def report(res: Dict[str, Any]) -> str:
    """Markdown: the gate study, and ROUGE-L per set with the gap closed on the five-set average."""
    lines = ["| cross gate | tau0 | teacher share | ROUGE-L of the rollouts | minus random (paired) |",
             "|---|---:|---:|---:|---:|"]
    for g, r in res["gates"].items():
        d, e = r["vs_random"]
        lines.append(f"| {g} | {r['tau0']:.4g} | {r['share']:.2f} | {r['rougeL']:.2f} ± {r['se']:.2f} | {d:+.2f} ± {e:.2f} |")
    c = res["calibration"]
    lines.append(f"\nSWITCH's training calibration ({res['gate']} gate, exponential schedule): tau0 {c['tau0']:.4g}, "
                 f"teacher share {c['share']:.2f} on the calibration prompts.")
    sets = real.SETS
    avg = {k: statistics.fmean(v[x]["rougeL"] for x in sets) for k, v in res["scores"].items()}
    lines += ["", "| model | " + " | ".join(sets) + " | avg | gap closed |", "|---|" + "---:|" * (len(sets) + 2)]
    t, i = avg["teacher"], avg["init"]
    for k, v in res["scores"].items():
        cells = " | ".join(f"{v[x]['rougeL']:.2f} ± {v[x]['se']:.2f}" for x in sets)
        gap = "" if k in ("teacher", "init") else f"{100 * (avg[k] - i) / max(t - i, 1e-9):.0f}%"
        lines.append(f"| {k} | {cells} | {avg[k]:.2f} | {gap} |")
    lines.append(f"\n{res['seconds'] / 60:.1f} min in all.")
    return "\n".join(lines)

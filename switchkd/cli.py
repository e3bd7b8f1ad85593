"""The ``switchkd`` command line: train, eval, generate, demo.

Every user mistake (bad config key, malformed data line, missing file) ends in a
one-line ``switchkd: error: ...`` message and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from switchkd.config import PRESET_DIR, ConfigError


def preset_path(name: str) -> str:
    """A config file path, or a preset name such as ``tiny/switch`` resolved under ``configs/``."""
    if Path(name).is_file() or not (PRESET_DIR / f"{name}.yaml").is_file():
        return name
    return str(PRESET_DIR / f"{name}.yaml")


def _presets(args: argparse.Namespace) -> None:
    for f in sorted(PRESET_DIR.glob("*/*.yaml")):
        if f.parent.name != "accelerate" and not f.name.startswith("_"):  # _base.yaml: shared by a family
            print(f"{f.parent.name}/{f.stem}")


def _calibrate(args: argparse.Namespace) -> None:
    from switchkd.calibrate import calibrate_config
    from switchkd.config import load_config

    if not 0.0 < args.target < 1.0:
        raise ConfigError(f"--target {args.target}: expected a teacher share in (0, 1)")
    from switchkd.calibrate import ln2_note

    cfg = load_config(preset_path(args.config), args.overrides)
    if cfg.method.source != "switch":
        raise ConfigError(f"{args.config}: method.source is {cfg.method.source!r}; switchkd calibrate finds SWITCH's "
                          "tau0 and needs a SWITCH config (method.source=switch), e.g. smollm2/switch")
    if not 0.0 <= args.tolerance < 0.5:
        raise ConfigError(f"--tolerance {args.tolerance}: expected a share difference in [0, 0.5)")
    tau0, share = calibrate_config(cfg, args.target, args.limit, args.batch_size,
                                   log=lambda line: print(line, file=sys.stderr, flush=True), tolerance=args.tolerance)
    print(f"method.switch.tau0={tau0:.6g}  (measured teacher share {share:.3f}, target {args.target})")
    sw = cfg.method.switch
    note = ln2_note(tau0, sw.decay, sw.schedule, sw.gate)
    if note:
        print(f"note: {note}")


def _train(args: argparse.Namespace) -> None:
    from switchkd.config import load_config, to_yaml

    cfg = load_config(preset_path(args.config), args.overrides)  # checked before the heavy imports
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    from switchkd.train import train

    final = train(cfg)
    print(f"final model: {final}")


def _launch(args: argparse.Namespace) -> None:
    from switchkd.launch import launch

    rc = launch(preset_path(args.config), args.overrides, args.accelerate, args.num_processes, args.launch_arg)
    if rc:
        raise SystemExit(rc)


def _eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    import torch

    from switchkd.checks import NAMED_TEMPLATES, _check_placeholders
    from switchkd.config import DataConfig, EvalConfig, ModelConfig
    from switchkd.evaluate import evaluate, format_table
    from switchkd.models import load_model, load_tokenizer

    _check_placeholders("--template", args.template, {"instruction", "input"}, NAMED_TEMPLATES, ConfigError)
    ecfg = EvalConfig(limit=args.limit, batch_size=args.batch_size, do_sample=not args.greedy,
                      max_prompt_length=args.max_prompt_length, max_length=args.max_length,
                      max_new_tokens=args.max_new_tokens, metric=args.metric)
    if args.seeds:
        if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
            raise ConfigError(f"--seeds {' '.join(map(str, args.seeds))}: expected distinct integers >= 0")
        ecfg.seeds = args.seeds
    if args.max_length <= args.max_prompt_length:
        raise ConfigError(f"--max-length {args.max_length}: must be larger than --max-prompt-length "
                          f"{args.max_prompt_length} (prompt and response share it)")
    out = Path(args.output) if args.output else Path("runs") / "eval" / (Path(args.model).name or "model")
    from switchkd.evaluate import OUTPUTS
    from switchkd.rundir import check_output_path

    check_output_path(out, "--output", "dir", [args.model, args.data, args.draft_for], reusable=OUTPUTS)
    fields = dict(item.partition("=")[::2] for item in args.field)
    if any(not k or not v for k, v in fields.items()):
        raise ConfigError(f"--field {args.field}: expected CANONICAL=NAME, e.g. instruction=question")
    from switchkd.checks import _check_fields
    from switchkd.evaluate import read_sets

    _check_fields(fields, ConfigError)
    mcfg = ModelConfig(name=args.model, dtype=args.dtype)
    tok = load_tokenizer(mcfg)
    from switchkd.data import resolve_template

    template = resolve_template(args.template, tok)
    sets = read_sets(args.data, tok, ecfg, DataConfig(template=args.template, fields=fields))  # before the model
    described = "the model's chat template" if template == "chat" else f"the {template!r} template"
    print(f"eval: prompts through {described}{' (--template auto)' if args.template == 'auto' else ''}", flush=True)
    model = load_model(mcfg, tok, trainable=False)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and args.max_length > limit:
        raise ConfigError(f"--max-length {args.max_length}: larger than the model's {limit} positions")
    if torch.cuda.is_available():
        model.cuda()
    target = None
    if args.draft_for:
        from switchkd.models import check_compatible

        tcfg = ModelConfig(name=args.draft_for, dtype=args.dtype)
        check_compatible(tok, load_tokenizer(tcfg))
        target = load_model(tcfg, tok, trainable=False)
        if torch.cuda.is_available():
            target.cuda()
    summary = evaluate(model, tok, sets, ecfg, None, out, target, args.draft_k)
    print(format_table(summary))
    for name, d in summary.get("draft", {}).items():
        print(f"draft for {args.draft_for} on {name}: {d['tokens_per_verification']:.2f} tokens per verification "
              f"(k={d['k']}, {100 * d['acceptance']:.1f}% written by the draft)")
    print(f"wrote {out / 'scores.json'} and {out / 'predictions.jsonl'}")


def _answers(args: argparse.Namespace) -> None:
    from switchkd.answers import answer_all, decoding, show, write_jsonl
    from switchkd.checks import NAMED_TEMPLATES, _check_fields, _check_placeholders
    from switchkd.config import DataConfig

    _check_placeholders("--template", args.template, {"instruction", "input"}, NAMED_TEMPLATES, ConfigError)
    fields = dict(item.partition("=")[::2] for item in args.field)
    if any(not k or not v for k, v in fields.items()):
        raise ConfigError(f"--field {args.field}: expected CANONICAL=NAME, e.g. instruction=question")
    _check_fields(fields, ConfigError)
    out = Path(args.output) if args.output else None
    if out is not None and (out.exists() or not out.parent.is_dir()):
        raise ConfigError(f"--output {out}: {'exists; choose a new file' if out.exists() else 'its folder does not exist'}")
    ecfg = decoding(not args.sample, args.max_new_tokens, args.max_prompt_length, args.batch_size)
    examples, answers = answer_all(args.model, args.data, args.limit, ecfg,
                                   DataConfig(template=args.template, fields=fields), args.dtype, args.seed)
    show(examples, answers)
    if out is not None:
        write_jsonl(out, examples, answers)
        print(f"wrote {len(examples)} records with {len(answers)} models' answers to {out}", file=sys.stderr)


def _generate(args: argparse.Namespace) -> None:
    from switchkd.config import load_config
    from switchkd.generate import generate_dataset
    from switchkd.rundir import check_output_path

    cfg = load_config(preset_path(args.config), args.overrides)
    check_output_path(args.output, "--output", "file", [cfg.data.train, cfg.data.dev, args.config])
    n = generate_dataset(cfg, args.output, args.batch_size)
    print(f"wrote {n} teacher responses to {args.output}")


def _cache_teacher(args: argparse.Namespace) -> None:
    from switchkd.config import load_config
    from switchkd.rundir import check_output_path
    from switchkd.teacher_cache import build_cache

    cfg = load_config(preset_path(args.config), args.overrides)
    check_output_path(args.output, "--output", "dir", [cfg.data.train, cfg.data.dev, cfg.teacher and cfg.teacher.name])
    out = build_cache(cfg, args.output, args.k, args.batch_size)
    print(f"wrote the teacher's top-{args.k} cache to {out}; train with method.teacher_cache={out}")


def _serve_teacher(args: argparse.Namespace) -> None:
    from switchkd.serve import serve_teacher

    serve_teacher(args.model, args.port, args.host, args.max_logprobs, args.dtype, args.vllm_args)


def _convert(args: argparse.Namespace) -> None:
    from switchkd.convert import convert_llama2c

    out = convert_llama2c(args.model_bin, args.tokenizer_bin, args.out_dir)
    print(f"wrote a Hugging Face Llama model and tokenizer to {out}")


def _convert_gguf(args: argparse.Namespace) -> None:
    from switchkd.gguf import convert_gguf

    out = convert_gguf(args.gguf_file, args.out_dir)
    print(f"wrote a Hugging Face model (safetensors) and tokenizer to {out}")


def _shrink(args: argparse.Namespace) -> None:
    from switchkd.shrink import parse_keep, shrink

    keep = parse_keep(args.keep) if args.keep is not None else None
    if args.layers is not None and (args.data is None) == (not args.even):
        raise ConfigError(f"shrink --layers {args.layers}: give --data FILE (keep the blocks of highest Block Influence "
                          "on that calibration data; measured better, docs/real-models.md) or --even (evenly spaced)")
    if args.even and args.layers is None:
        raise ConfigError("shrink: --even goes with --layers N")
    out, kept = shrink(args.teacher, args.out_dir, layers=args.layers, keep=keep, data=args.data,
                       samples=args.samples)
    from switchkd.models import saved_parameters

    how = " (highest Block Influence)" if args.data else ""
    count = saved_parameters(out)
    teacher = saved_parameters(args.teacher) if Path(args.teacher).is_dir() else None
    size = f"; {count / 1e6:.1f}M parameters" if count else ""
    size += f" (teacher {teacher / 1e6:.1f}M)" if count and teacher else ""
    print(f"kept decoder blocks {','.join(map(str, kept))}{how}{size}; wrote the student to {out}")


def _count(text: str) -> int:
    from switchkd.prune_shapes import parse_count

    return parse_count(text)


def _prune(args: argparse.Namespace) -> None:
    from switchkd.prune import Shape, prune

    shape = Shape(hidden=args.hidden, mlp=args.mlp, heads_per_group=args.heads_per_group, layers=args.layers)
    if (shape == Shape()) == (args.params is None):
        raise ConfigError("prune: give the sizes to keep (--hidden, --mlp, --heads-per-group, --layers: any subset) "
                          "or --params N, not both")
    r = prune(args.teacher, args.out_dir, shape, args.data, samples=args.samples, batch_size=args.batch_size,
              max_length=args.max_length, params=args.params)
    s = r["shape"]
    print(f"hidden {s.hidden}, MLP {s.mlp}, {s.heads_per_group} query heads per key/value group, blocks "
          f"{','.join(map(str, r['blocks']))} (importance from {r['examples']} examples)")
    print(f"{r['parameters'] / 1e6:.1f}M parameters (teacher {r['teacher_parameters'] / 1e6:.1f}M); "
          f"wrote the student to {r['out']}")


def _debias(args: argparse.Namespace) -> None:
    from switchkd.debias import debias_cli

    r = debias_cli(args)
    b, a = r["before"], r["after"]
    for k in ("ambig", "disambig"):
        if k in b:
            print(f"{k}: accuracy {100 * b[k]['mean']:.2f} -> {100 * a[k]['mean']:.2f}")
    print(f"pruned {r['n']} neurons; model and debias_report.json/.md in {args.output}")


def _demo(args: argparse.Namespace) -> None:
    from switchkd.demo import run_demo

    try:
        run_demo(out_dir=args.output, quick=args.quick, methods=args.methods.split(",") if args.methods else None,
                 workers=args.workers)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"demo --methods: {e}") from None


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``switchkd: error: ...`` and exit status 2, no usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"switchkd: error: {self.prog.removeprefix('switchkd').strip() or 'switchkd'}: {message}",
              file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from switchkd import __version__
    from switchkd.config import DataConfig, EvalConfig, ModelConfig
    from switchkd.schema import add_flags

    p = _Parser(prog="switchkd", description="Distil a teacher causal LM into a student.")
    p.add_argument("--version", action="version", version=f"switchkd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a student from a YAML config")
    t.add_argument("config", help="YAML file or preset name, e.g. configs/tiny/kd.yaml or tiny/kd")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=1e-4")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="generate and score ROUGE-L on a data file or a MiniLLM-style directory")
    e.add_argument("--model", required=True, help="model directory or hub id")
    e.add_argument("--data", required=True, help="JSONL file, a directory with the five MiniLLM sets, or a built-in suite: synthetic:test, arith:test")
    e.add_argument("--output", help="where scores.json and predictions.jsonl go (default runs/eval/<model name>)")
    e.add_argument("--seeds", type=int, nargs="+", help="sampling seeds (default 10 20 30 40 50)")
    e.add_argument("--greedy", action="store_true", help="greedy decoding, one pass")
    # type, range, default and help of these come from the config schema (eval.*, model.dtype, data.template)
    add_flags(e, EvalConfig, ("limit", "batch_size", "max_prompt_length", "max_length", "max_new_tokens", "metric"))
    add_flags(e, DataConfig, ("template",))
    add_flags(e, ModelConfig, ("dtype",))
    e.add_argument("--field", action="append", default=[], metavar="CANONICAL=NAME",
                   help="map a canonical field to yours, e.g. --field instruction=question --field output=answer")
    e.add_argument("--draft-for", metavar="TEACHER",
                   help="also measure the model as a greedy speculative-decoding draft for TEACHER (same tokenizer)")
    e.add_argument("--draft-k", type=positive, default=4, help="draft tokens per verification (default 4)")
    e.set_defaults(func=_eval)

    an = sub.add_parser("answers", help="print several models' answers to the same prompts side by side (each through "
                        "its own chat template), optionally written as JSONL")
    an.add_argument("--model", action="append", required=True, help="model directory or hub id; repeat for several")
    an.add_argument("--data", required=True, help="a JSON/JSONL file in any format training reads, or a built-in suite "
                    "(synthetic:test, arith:test)")
    an.add_argument("--limit", type=positive, default=5, help="the first N records (default 5)")
    an.add_argument("--output", help="also write the records and answers here as JSON Lines (a new file)")
    an.add_argument("--max-new-tokens", type=positive, default=128, help="answer tokens (default 128)")
    an.add_argument("--max-prompt-length", type=positive, default=256, help="longer prompts keep their last tokens")
    an.add_argument("--batch-size", type=positive, default=8, help="prompts per generation batch")
    an.add_argument("--sample", action="store_true", help="sample at temperature 1 (default: greedy)")
    an.add_argument("--seed", type=int, default=None, help="the sampling seed")
    add_flags(an, DataConfig, ("template",))
    add_flags(an, ModelConfig, ("dtype",))
    an.add_argument("--field", action="append", default=[], metavar="CANONICAL=NAME",
                    help="map a canonical field to yours, e.g. --field instruction=question --field output=answer")
    an.set_defaults(func=_answers)

    g = sub.add_parser("generate", help="write the teacher's responses to data.train as a JSONL dataset (SeqKD)")
    g.add_argument("config", help="YAML preset naming teacher and data, e.g. configs/tiny/seqkd.yaml")
    g.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    g.add_argument("--output", required=True, help="JSONL file to write")
    g.add_argument("--batch-size", type=positive, default=16)
    g.set_defaults(func=_generate)

    ct = sub.add_parser("cache-teacher", help="precompute the teacher's top-k log-probabilities for data.train")
    ct.add_argument("config", help="YAML preset naming teacher and data")
    ct.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    ct.add_argument("--output", required=True, help="cache directory")
    ct.add_argument("--k", type=positive, default=64)
    ct.add_argument("--batch-size", type=positive, default=16)
    ct.set_defaults(func=_cache_teacher)

    st = sub.add_parser("serve-teacher", help="serve a teacher with vLLM's OpenAI-compatible server for teacher.server "
                        "(other flags go to vLLM)")
    st.add_argument("model", help="teacher model directory or hub id (a GGUF file: switchkd convert gguf first)")
    st.add_argument("--port", type=positive, default=8000)
    st.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    st.add_argument("--max-logprobs", type=positive, default=64,
                    help="log-probabilities per position the server may return (at least teacher.top_k)")
    st.add_argument("--dtype", default="auto", help="the weights' dtype in vLLM (auto: the model's; float32 for "
                    "targets equal to an fp32 teacher in the process)")
    st.set_defaults(func=_serve_teacher, vllm_args=[])

    c = sub.add_parser("convert", help="convert a foreign checkpoint to a Hugging Face model directory")
    csub = c.add_subparsers(dest="format", required=True)
    ll = csub.add_parser("llama2c", help="llama2.c model.bin + tokenizer.bin -> Llama directory")
    ll.add_argument("model_bin")
    ll.add_argument("tokenizer_bin")
    ll.add_argument("out_dir")
    ll.set_defaults(func=_convert)
    gg = csub.add_parser("gguf", help="a GGUF checkpoint (llama.cpp, Ollama) -> Hugging Face directory (needs gguf)")
    gg.add_argument("gguf_file", help="the .gguf file")
    gg.add_argument("out_dir", help="new directory for the model (safetensors), config and tokenizer")
    gg.set_defaults(func=_convert_gguf)

    sh = sub.add_parser("shrink", help="a depth-pruned student: a teacher's decoder blocks of highest Block "
                                       "Influence, evenly spaced or chosen")
    sh.add_argument("teacher", help="teacher model directory or hub id")
    sh.add_argument("out_dir", help="new directory for the student model and tokenizer")
    how = sh.add_mutually_exclusive_group(required=True)
    how.add_argument("--layers", type=positive, help="keep N blocks: with --data those of highest Block "
                                                     "Influence, with --even evenly spaced")
    how.add_argument("--keep", help="keep these blocks, e.g. 0,3,7 (0-based, increasing)")
    sh.add_argument("--data", help="with --layers: keep the blocks with the highest Block Influence on this "
                                   "calibration data (any format train reads) instead of evenly spaced ones")
    sh.add_argument("--samples", type=positive, default=128, help="calibration examples for --data")
    sh.add_argument("--even", action="store_true", help="with --layers: keep N evenly spaced blocks, first and last "
                                                        "included (no calibration data)")
    sh.set_defaults(func=_shrink)

    pr = sub.add_parser("prune", help="a width- and depth-pruned student (Minitron: activation importance, "
                                      "Block Influence) from a Llama-family or GPT-2 teacher")
    pr.add_argument("teacher", help="teacher model directory or hub id")
    pr.add_argument("out_dir", help="new directory for the student model and tokenizer")
    pr.add_argument("--hidden", type=positive, help="hidden (embedding) channels to keep (Llama family)")
    pr.add_argument("--mlp", type=positive, help="MLP neurons to keep in every block")
    pr.add_argument("--heads-per-group", type=positive,
                    help="query heads to keep in every key/value group (Llama family; GQA groups are kept)")
    pr.add_argument("--layers", type=positive, help="decoder blocks to keep, those with the highest Block Influence")
    pr.add_argument("--params", type=_count, help="instead of sizes: a parameter budget, e.g. 60M; the shape of a "
                                                 "small width/depth grid within 5%% of it whose pruned model has the "
                                                 "lowest cross-entropy on held-out calibration examples")
    pr.add_argument("--data", required=True, help="calibration text: a JSON/JSONL file in any format `train` reads "
                                                  "(the chat template applied), or a built-in suite")
    pr.add_argument("--samples", type=positive, default=1024, help="calibration examples (Minitron: 1024)")
    pr.add_argument("--batch-size", type=positive, default=8, help="examples per forward")
    pr.add_argument("--max-length", type=positive, default=512, help="tokens per calibration example")
    pr.set_defaults(func=_prune)

    b = sub.add_parser("debias", help="CRISPR: find and zero bias neurons, scored on BBQ-format data")
    b.add_argument("--model", required=True, help="model directory (causal LM or encoder-decoder)")
    b.add_argument("--data", required=True, nargs="+", help="BBQ JSONL files")
    b.add_argument("--output", required=True, help="directory for the pruned model and reports")
    b.add_argument("--dev-fraction", type=float, default=0.1)
    b.add_argument("--instances", type=int, default=20, help="attribution instances sampled from dev")
    b.add_argument("--instructions", type=int, default=10, help="how many built-in instructions (1-10)")
    b.add_argument("--candidates", type=int, nargs="+", help="values of n to search (default 0 1 2 4 ... 64)")
    b.add_argument("--target", choices=["p", "logp"], default="p", help="attribute P (paper) or log P (public code)")
    b.add_argument("--gold-clamp", choices=["instance", "batch"], default="instance")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--limit", type=int, help="use N records")
    b.add_argument("--eval-limit", type=int, help="score N test records before/after")
    b.set_defaults(func=_debias)

    la = sub.add_parser("launch", help="train on several processes or machines through accelerate launch, the "
                        "config checked first")
    la.add_argument("config", help="YAML file or preset name, as for train")
    la.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    la.add_argument("--accelerate", required=True, metavar="FILE",
                    help="accelerate config, e.g. configs/accelerate/fsdp.yaml")
    la.add_argument("--num-processes", type=positive, help="processes in all (default: the accelerate config's)")
    la.add_argument("--launch-arg", action="append", default=[], metavar="ARG",
                    help="passed to accelerate launch as is, e.g. --launch-arg=--machine_rank=1 (repeatable)")
    la.set_defaults(func=_launch)

    pr = sub.add_parser("presets", help="list the shipped presets (usable as switchkd train NAME)")
    pr.set_defaults(func=_presets)

    cal = sub.add_parser("calibrate", help="SWITCH: find method.switch.tau0 for a target teacher-written share on dev prompts")
    cal.add_argument("config", help="YAML file or preset name, e.g. tiny/switch")
    cal.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    cal.add_argument("--target", type=float, required=True, help="teacher-written share, e.g. 0.53")
    cal.add_argument("--limit", type=positive, default=32, help="prompts read from data.dev (else data.train)")
    cal.add_argument("--batch-size", type=positive, default=8, help="prompts rolled out per measurement")
    cal.add_argument("--tolerance", type=float, default=0.01,
                     help="stop at the first tau0 whose measured share is this close to --target (default 0.01)")
    cal.set_defaults(func=_calibrate)

    d = sub.add_parser("demo", help="the built-in end-to-end demo on the synthetic suite")
    d.add_argument("--output", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="a much smaller run (for tests)")
    d.add_argument("--methods", help="comma-separated methods (default sft,kd,gkd,switch; any of the tiny presets)")
    d.add_argument("--workers", type=int, choices=range(1, 65), metavar="N",
                   help="worker processes (default: 2 when the CPU has 2 cores or more)")
    d.set_defaults(func=_demo)
    return p


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA or host allocation failure (torch raises OutOfMemoryError, or RuntimeError on the CPU)."""
    text = str(exc)
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
        "out of memory" in text or "can't allocate memory" in text


def parse(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> argparse.Namespace:
    """Parse ``argv``; ``dotted.key=value`` overrides are accepted anywhere after the config (also after
    a flag, e.g. ``calibrate CONFIG --target 0.53 train.seed=2``), anything else unknown is an error."""
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "serve-teacher":  # the rest are vLLM's own flags
        args.vllm_args = extra
        return args
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def quiet_third_parties() -> None:
    """DeepSpeed announces "Setting accelerator to CPU" on every import on a machine without a GPU: name
    the accelerator up front there (a user's own DS_ACCELERATOR is kept)."""
    import os

    if "DS_ACCELERATOR" not in os.environ and not os.path.exists("/dev/nvidiactl"):
        os.environ["DS_ACCELERATOR"] = "cpu"


def report_user_error(message: str) -> None:
    """``switchkd: error: message`` on stderr, once: under a multi-process launcher only rank 0 prints (every
    rank meets the same mistake) and, for ``switchkd launch``, records it in ``SWITCHKD_ERROR_FILE``."""
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"switchkd: error: {message}", file=sys.stderr, flush=True)
    if os.environ.get("SWITCHKD_ERROR_FILE"):
        Path(os.environ["SWITCHKD_ERROR_FILE"]).write_text(message)


def main(argv: Optional[List[str]] = None) -> int:
    quiet_third_parties()
    try:
        args = parse(build_parser(), argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2, already reported in one line)
        return int(exc.code or 0)
    try:
        args.func(args)
    except SystemExit as exc:  # a command's own exit status (switchkd launch: the processes')
        return int(exc.code or 0)
    except ConfigError as exc:
        report_user_error(str(exc))
        return 2
    except BrokenPipeError:  # e.g. switchkd presets | head: the reader left; no traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:  # on a new line (a progress bar may hold the current one)
        hint = "; continue it with the same command and train.resume=true" if args.command == "train" else ""
        print(f"\nswitchkd: interrupted{hint}", file=sys.stderr, flush=True)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if type(exc).__name__ == "TrainingError":
            print(f"switchkd: error: {exc}", file=sys.stderr)
            return 1
        if not is_out_of_memory(exc):
            raise
        print(f"switchkd: error: out of memory ({str(exc).splitlines()[0][:120]}); lower train.batch_size (keep the "
              "effective batch with train.grad_accum), set train.loss_chunk=128 and train.gradient_checkpointing=true, "
              "or eval/generate --batch-size", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

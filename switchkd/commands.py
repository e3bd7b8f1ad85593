"""The ``switchkd`` commands' handlers: each takes the parsed arguments (:func:`switchkd.cli.build_parser`) and
raises :class:`~switchkd.config.ConfigError` for a user mistake (``switchkd.cli.main`` prints it as one line)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    from dataclasses import replace

    from switchkd.calibrate import calibrate_config
    from switchkd.config import load_config
    from switchkd.methods import source_class

    if not 0.0 < args.target < 1.0:
        raise ConfigError(f"--target {args.target}: expected a teacher share in (0, 1)")
    from switchkd.calibrate import gate_of, ln2_note

    cfg = load_config(preset_path(args.config), args.overrides)
    try:
        gate = gate_of(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{args.config}: {exc}") from None
    if not 0.0 <= args.tolerance < 0.5:
        raise ConfigError(f"--tolerance {args.tolerance}: expected a share difference in [0, 0.5)")
    tau0, share = calibrate_config(cfg, args.target, args.limit, args.batch_size,
                                   log=lambda line: print(line, file=sys.stderr, flush=True), tolerance=args.tolerance)
    print(f"method.{source_class(cfg.method.source).section}.tau0={tau0:.6g}  (measured teacher share {share:.3f}, "
          f"target {args.target})")
    note = ln2_note(replace(gate, tau0=tau0))
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
    from switchkd.evaluate import evaluate, format_table
    from switchkd.models import load_model, load_tokenizer
    from switchkd.sections import DataConfig, EvalConfig, ModelConfig

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
    fields = _field_map(args.field)
    from switchkd.evaluate import read_sets

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


def _field_map(items: list) -> dict:
    """``--field CANONICAL=NAME`` flags -> ``{canonical: name}``, checked (one-line errors)."""
    from switchkd.checks import _check_fields

    fields = dict(item.partition("=")[::2] for item in items)
    if any(not k or not v for k, v in fields.items()):
        raise ConfigError(f"--field {items}: expected CANONICAL=NAME, e.g. instruction=question")
    _check_fields(fields, ConfigError)
    return fields


def _answers(args: argparse.Namespace) -> None:
    from switchkd.answers import answer_all, decoding, show, write_jsonl
    from switchkd.checks import NAMED_TEMPLATES, _check_placeholders
    from switchkd.sections import DataConfig

    _check_placeholders("--template", args.template, {"instruction", "input"}, NAMED_TEMPLATES, ConfigError)
    fields = _field_map(args.field)
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
    from switchkd.prune import Shape
    from switchkd.prune_run import prune

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

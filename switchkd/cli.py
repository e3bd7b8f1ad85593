"""The ``switchkd`` command line: train, eval, generate, demo.

Every user mistake (bad config key, malformed data line, missing file) ends in a
one-line ``switchkd: error: ...`` message and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from switchkd.commands import (  # noqa: F401  (preset_path: re-exported)
    _answers,
    _cache_teacher,
    _calibrate,
    _convert,
    _convert_gguf,
    _count,
    _debias,
    _demo,
    _eval,
    _generate,
    _launch,
    _presets,
    _prune,
    _serve_teacher,
    _shrink,
    _train,
    preset_path,
)
from switchkd.sections import ConfigError


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
    from switchkd.schema import add_flags
    from switchkd.sections import DataConfig, EvalConfig, ModelConfig

    p = _Parser(prog="switchkd", description="Distil a teacher causal LM into a student.")
    p.add_argument("--version", action="version", version=f"switchkd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a student from a YAML config")
    t.add_argument("config", help="YAML file or preset name, e.g. configs/tiny/kd.yaml or tiny/kd")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=1e-4")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="generate and score ROUGE-L on a data file or a directory of the protocol's five sets")
    e.add_argument("--model", required=True, help="model directory or hub id")
    e.add_argument("--data", required=True, help="JSONL file, a directory with the five sets of the community protocol (dolly, self-inst, vicuna, sinst, uinst), or a built-in suite: synthetic:test, arith:test")
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

    g = sub.add_parser("generate", help="write the teacher's responses to data.train as a JSONL dataset (sequence-level distillation data)")
    g.add_argument("config", help="YAML file or preset naming teacher and data")
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

    cal = sub.add_parser("calibrate", help="find the tau0 of a config's gate (method.<section>.tau0) for a target teacher-written share on dev prompts")
    cal.add_argument("config", help="YAML file or preset name whose source decodes by a gate")
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
    d.add_argument("--methods", help="comma-separated presets of configs/tiny (default: configs/demo.yaml's methods)")
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

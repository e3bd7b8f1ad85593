"""``switchkd convert gguf``: a GGUF checkpoint (llama.cpp / Ollama) -> a plain Hugging Face directory.

transformers reads GGUF itself (``from_pretrained(dir, gguf_file=...)``, dequantizing every tensor
to float32) but the model it returns keeps a quantization flag and refuses ``save_pretrained``.
Its state dict is loaded into a fresh model built from the same config with that flag removed,
which gives identical logits and saves as safetensors; the tokenizer (with the chat template the
GGUF file carries) is saved beside it.  The output appears only when complete (temporary
directory, renamed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Tuple

from switchkd.sections import ConfigError

GGUF_MAGIC = b"GGUF"


def _check_file(path: Path) -> None:
    """One-line errors for a missing file, a folder, or a file that is not GGUF."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; expected a .gguf file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    with path.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ConfigError(f"{path}: not a GGUF file (its first bytes are {head!r}, expected b'GGUF')")


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError("convert gguf needs the 'gguf' package: pip install -e '.[gguf]' (or pip install gguf)") from None


def load_gguf(path: str | Path) -> Tuple[Any, Any]:
    """``(model, tokenizer)`` as transformers loads the GGUF file (float32, still flagged as quantized)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    _check_file(path)
    _require_gguf()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # truncated tensors, an architecture transformers cannot read, ...
        if isinstance(exc, (KeyboardInterrupt, MemoryError)):
            raise
        raise ConfigError(f"{path}: cannot load as GGUF ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model, tok


def plain_model(model: Any) -> Any:
    """A fresh model of ``model``'s class and config, without the quantization flag, holding its weights."""
    import copy

    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = type(model)(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ())
    if unexpected or [k for k in missing if k not in tied]:
        raise ConfigError(f"GGUF weights do not fit {type(model).__name__}: {sorted(missing)[:3]} missing, "
                          f"{sorted(unexpected)[:3]} unexpected")
    plain.tie_weights()
    return plain.eval()


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write ``save_pretrained`` model (safetensors, float32) and tokenizer to ``out_dir`` (new, or an
    empty directory) through a temporary directory renamed when complete; returns it."""
    from switchkd.rundir import check_output_path, write_new_dir

    out = check_output_path(out_dir, "OUT_DIR", "dir", [gguf_file])  # before anything is read
    model, tok = load_gguf(gguf_file)
    plain = plain_model(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    plain.config.pad_token_id = tok.pad_token_id
    return write_new_dir(out, lambda tmp: (plain.save_pretrained(tmp, safe_serialization=True), tok.save_pretrained(tmp)))

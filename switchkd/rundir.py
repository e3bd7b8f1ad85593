"""A run's output directory: refusing to overwrite a finished run or to share it with a running one,
checking it is writable before anything loads, trimming the metrics log on resume."""

from __future__ import annotations

import atexit
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from switchkd.sections import ConfigError

if TYPE_CHECKING:
    from switchkd.config import Config

RUN_FILES = ("metrics.jsonl", "config.yaml", "final", "best", "checkpoints")


LOCK = ".switchkd.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_new_dir(out: Path, write: "Callable[[Path], None]") -> Path:
    """Create the new (or empty) directory ``out`` by ``write(tmp)`` into a temporary sibling renamed when
    complete, so that ``out`` is never half-written; one-line errors for an existing or unwritable ``out``."""
    import tempfile

    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"{out}: already exists; choose a new output directory (nothing is overwritten)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write here ({exc.strerror})") from None
    try:
        write(tmp)
        tmp.chmod(0o755)
        if out.is_dir():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_writable(out: Path, name: str = "output.dir=") -> None:
    """Prove ``out`` (or its nearest existing parent) can be written, leaving nothing behind; ``name``
    prefixes the path in the error (``output.dir=``, ``--output ``)."""
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        probe = base / f".switchkd-probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise ConfigError(f"{name}{out}: cannot write there ({exc.strerror or exc} in {base})") from None


def check_output_path(out: "str | Path", flag: str, kind: str, inputs: "tuple | list" = (),
                      reusable: "tuple | list" = ()) -> Path:
    """Check a path a command will write before anything loads; returns it.

    ``kind`` ``file``: not a directory (an existing file is replaced atomically by the command); ``dir``: new,
    empty, or holding only names in ``reusable`` (the command's own earlier outputs).  Refused with one line:
    the output equal to (or, for a directory, containing) one of ``inputs``, the wrong kind, a directory with
    other content, a place that cannot be written."""
    out = Path(out)
    here = out.resolve()
    for src in inputs:
        if not src or not Path(src).exists():
            continue
        s = Path(src).resolve()
        if s == here or (kind == "dir" and here in s.parents):
            raise ConfigError(f"{flag} {out}: is (or holds) the input {src}; write the output elsewhere")
    if kind == "dir" and here == Path.cwd().resolve():
        raise ConfigError(f"{flag} {out}: is the current directory; name a new directory for the output")
    if kind == "file" and out.is_dir():
        raise ConfigError(f"{flag} {out}: is a directory; expected a file name")
    if kind == "dir" and out.exists():
        if not out.is_dir():
            raise ConfigError(f"{flag} {out}: already exists and is not a directory")
        other = sorted(p.name for p in out.iterdir() if p.name not in reusable)
        if other:
            raise ConfigError(f"{flag} {out}: already exists with other files in it ({other[0]}, ...); name a new "
                              "or empty directory (nothing is overwritten)")
    check_writable(out if kind == "dir" else out.parent, f"{flag} ")
    return out


def write_text_atomic(path: "str | Path", text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling renamed when complete (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _holder(out: Path) -> int:
    """The live process holding ``out``'s lock, else 0."""
    try:
        pid = int((out / LOCK).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0
    return pid if pid and pid != os.getpid() and _alive(pid) else 0


def acquire_lock(out: Path) -> Path:
    """Hold ``out/.switchkd.lock`` (this process's id) for the life of the process: a second run into the same
    directory refuses in one line while the first is alive; a lock left by a dead process is taken over."""
    lock = out / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _holder(out)
            if pid:
                raise ConfigError(f"output.dir={out}: another switchkd run (process {pid}) is writing there; wait "
                                  "for it or choose another output.dir") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(release_lock, out)
        return lock
    raise ConfigError(f"output.dir={out}: cannot take {lock}")


def release_lock(out: Path) -> None:
    """Remove ``out``'s lock if this process holds it."""
    lock = out / LOCK
    try:
        if lock.read_text().strip() == str(os.getpid()):
            lock.unlink()
    except OSError:
        pass


def check_output_dir(cfg: Config) -> None:
    """Refuse an ``output.dir`` that is not writable, that another live run holds, or that already holds a
    run unless resuming it or ``output.overwrite``; with ``output.overwrite`` remove only the run's own
    files (never anything else in the directory)."""
    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir={out}: exists and is not a directory")
    _check_not_an_input(out, cfg)
    check_writable(out)
    if _holder(out):
        raise ConfigError(f"output.dir={out}: another switchkd run (process {_holder(out)}) is writing there; "
                          "wait for it or choose another output.dir")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found == ["config.yaml"]:  # a run that stopped before its first step (e.g. out of memory): nothing to keep
        found = [] if cfg.train.resume else found
        if not cfg.train.resume:
            (out / "config.yaml").unlink()
            return
    if not found or cfg.train.resume:
        return
    if not cfg.output.overwrite:
        raise ConfigError(f"output.dir={out}: already holds a run ({', '.join(found)}); set train.resume=true to "
                          "continue it or output.overwrite=true to replace it")
    for name in found:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _check_not_an_input(out: Path, cfg: Config) -> None:
    """Refuse an ``output.dir`` that is (or holds) one of the run's local inputs: the run would write into it."""
    here = out.resolve()
    sections = [("model", cfg.model), ("teacher", cfg.teacher)]
    inputs = [(f"{n}.{k}", getattr(m, k)) for n, m in sections if m is not None for k in ("name", "adapter")]
    inputs += [("data.train", cfg.data.train), ("data.dev", cfg.data.dev), ("method.lm_data", cfg.method.lm_data),
               ("method.teacher_cache", cfg.method.teacher_cache)]
    for key, src in inputs:
        if src and Path(src).exists():
            s = Path(src).resolve()
            if s == here or here in s.parents:
                raise ConfigError(f"output.dir={out}: is (or holds) the run's input {key}={src}; a run writes "
                                  "config.yaml, checkpoints/ and final/ there: choose another output.dir")


def truncate_metrics(out: Path, step: int) -> None:
    """Keep the lines of ``out/metrics.jsonl`` up to optimizer step ``step`` (a resumed run logs the rest again)."""
    path = out / "metrics.jsonl"
    if path.is_file():
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line + "\n")
            except ValueError:
                continue  # a line cut by the kill
        path.write_text("".join(keep), encoding="utf-8")

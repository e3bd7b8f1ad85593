"""Build the demo teacher shipped in ``switchkd/demo_models/teacher`` (``make demo-teacher``; an
optional argument writes it elsewhere).

The teacher is ``switchkd.demo.TEACHER`` (a 4-layer, 128-wide GPT-2 with the byte-level tokenizer)
trained by SFT on the built-in synthetic suite: 800 steps, batch 16, lr 2.5e-3, 30 warm-up steps,
4,000 training examples (about 6 minutes on 2 CPU cores).  The result is written with the SHA-256 of
its weights (``SHA256``), which the demo checks before use.  CPU training is deterministic on one
machine; another machine or torch version may give slightly different weights (and checksum).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from switchkd.config import load_config  # noqa: E402
from switchkd.demo import SHIPPED, TEACHER, Budget, sft_overrides  # noqa: E402
from switchkd.train import train  # noqa: E402


def main(dst: Path = SHIPPED) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        final = train(load_config(None, sft_overrides(TEACHER, 800, 2.5e-3, Budget()) + [f"output.dir={tmp}/run"]))
        staged = Path(tmp) / "teacher"
        staged.mkdir()
        for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json",
                  "added_tokens.json", "special_tokens_map.json"):
            if (final / f).is_file():
                shutil.copy(final / f, staged / f)
        digest = hashlib.sha256((staged / "model.safetensors").read_bytes()).hexdigest()
        (staged / "SHA256").write_text(f"{digest}  model.safetensors\n")
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(staged, dst)
    print(f"demo teacher written to {dst} (sha256 {digest})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED)

"""Make the GPU check's kit: the embedded model's tokenizer and a few hundred KB of real text.

The GPU machine has no network and only the working tree travels (64 MiB; the embedded model's 93 MB GGUF
does not fit), so the check brings what it needs here: ``.gpu_kit/tokenizer/`` (SmolLM2's tokenizer,
~3.5 MB), ``calibration.txt`` and ``validation.txt`` (the wiki extract's calibration and validation
splits, cut to ``--chars``). ``.gpu_kit/`` is git-ignored and carried by the device tool.

    python benchmarks/gpu_kit.py            # after scripts/install.sh (the assets are prepared there)
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_kit(out: Path, chars: int = 400_000) -> Path:
    from transformers import AutoTokenizer

    from mixsparse.assets import embedded_model_dir
    from mixsparse.data import load_corpus

    out.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(out / "tokenizer")
    for split in ("calibration", "validation"):
        (out / f"{split}.txt").write_text(load_corpus("wiki", split)[:chars])
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / ".gpu_kit"))
    ap.add_argument("--chars", type=int, default=400_000, help="characters of text per split")
    a = ap.parse_args()
    print(make_kit(Path(a.out), a.chars))

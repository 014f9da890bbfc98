"""Make the MLflow UI screenshots of docs/ui.md: run the browser test (tests/test_ui.py), which saves a PNG of each
page it checks, and write them to docs/images/ as small PNGs (1000 px wide, 64-colour palette).

    python scripts/ui_screenshots.py [--out docs/images]

Needs what the test needs (selenium, Debian's chromium and chromium-driver: `make browser`); takes about as
long as the test (minutes). Exits with the test's status; nothing is written unless it passed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 1000
COLOURS = 64


def shrink(src: Path, dst: Path) -> None:
    """A screenshot -> a small PNG: scaled to WIDTH px wide, palette of COLOURS colours."""
    img = Image.open(src).convert("RGB")
    img = img.resize((WIDTH, round(img.height * WIDTH / img.width)), Image.LANCZOS)
    img.quantize(COLOURS, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs" / "images"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as shots:
        env = dict(os.environ, BINCOUNTER_UI_SHOTS=shots, PYTHONPATH=str(ROOT))
        test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "slow", "-p", "no:cacheprovider",
                               "tests/test_ui.py::test_ui_workflow"], cwd=ROOT, env=env)
        if test.returncode != 0:
            print(f"ui_screenshots: the browser test failed ({test.returncode}); nothing written", file=sys.stderr)
            return test.returncode
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for src in sorted(Path(shots).glob("*.png")):
            shrink(src, out / src.name)
            print(f"wrote {out / src.name} ({(out / src.name).stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

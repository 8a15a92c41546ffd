"""Build what a cluster needs into dist/: the wheel, and a zip of the package for `--py-files`.

    python scripts/build_dist.py            # (what `make dist` runs)

The wheel is for clusters that install packages on every node (pip install,
a bootstrap action, an image); the zip is for `spark-submit --py-files`,
which puts it on the executors' Python path. The zip carries sparkrec only:
its dependencies (numpy, pandas, pyarrow, faiss-cpu, scipy, pyyaml, pydantic) must
be on the nodes, or shipped with a packed environment (`make dist-env`).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "dist"


def build_zip(out: Path) -> Path:
    files = sorted(p for p in (ROOT / "sparkrec").rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for p in files:
            z.write(p, p.relative_to(ROOT).as_posix())
    return out


def main() -> int:
    DIST.mkdir(exist_ok=True)
    for old in [*DIST.glob("sparkrec-*.whl"), *DIST.glob("sparkrec*.zip")]:
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(DIST), str(ROOT)], check=True)
    sys.path.insert(0, str(ROOT))
    from sparkrec import __version__

    z = build_zip(DIST / f"sparkrec-{__version__}.zip")
    for p in sorted(DIST.iterdir()):
        print(p.relative_to(ROOT))
    print(f"py-files archive: {z.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Execute the notebooks in place, top to bottom in a fresh kernel each, saving their outputs.

    python notebooks/execute.py [--smoke] [names...]

Names select notebooks by prefix (``01``, ``03_analytic``); none means all of them. The kernel
runs in the repository root, so runs go to ``runs/notebooks/<notebook>/``, and reads MNIST from
``$PYRO_VAE_DATA``. The full setting is the default (about 83 minutes for all seven on a 2-core
CPU, the sum of the times the notebooks saved; run them on a quiet machine, as each notebook
saves its own wall-clock time);
``--smoke`` sets ``PYRO_VAE_SMOKE=1`` for the small setting the tests use, in about a minute.
After a full run, the first figure of each notebook's cell tagged ``readme-figure`` is written to
``docs/figures/notebook_<name>.png``, for the README. A notebook with a failing cell is not
written; the error names the cell.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent
ROOT = NOTEBOOKS.parent
FIGURES = ROOT / "docs" / "figures"
FIGURE_TAG = "readme-figure"


def select(names: list[str]) -> list[Path]:
    notebooks = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return notebooks
    chosen = [path for path in notebooks if any(path.stem.startswith(Path(name).stem) for name in names)]
    unknown = [name for name in names if not any(path.stem.startswith(Path(name).stem) for path in notebooks)]
    if unknown:
        sys.exit(f"no notebook matches {unknown}; choose from {[path.stem for path in notebooks]}")
    return chosen


def tagged_figure(notebook) -> bytes | None:
    """The first PNG output of the first cell tagged ``readme-figure``, if any."""
    for cell in notebook.cells:
        if FIGURE_TAG in cell.metadata.get("tags", []):
            for output in cell.get("outputs", []):
                if "image/png" in output.get("data", {}):
                    return base64.b64decode(output["data"]["image/png"])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks by name prefix, e.g. 01 or 03_analytic (default: all)")
    parser.add_argument("--smoke", action="store_true", help="the small setting (PYRO_VAE_SMOKE=1) instead of the full one")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env.pop("PYRO_VAE_SMOKE", None)
    if args.smoke:
        env["PYRO_VAE_SMOKE"] = "1"
    for path in select(args.names):
        notebook = nbformat.read(path, as_version=4)
        print(f"{path.name}: executing ({'smoke' if args.smoke else 'full'} setting)", flush=True)
        started = time.perf_counter()
        client = NotebookClient(notebook, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
        client.execute(env=env)
        nbformat.write(notebook, path)
        print(f"{path.name}: done in {time.perf_counter() - started:.0f} s, outputs saved", flush=True)
        figure = None if args.smoke else tagged_figure(notebook)
        if figure is not None:
            FIGURES.mkdir(parents=True, exist_ok=True)
            target = FIGURES / f"notebook_{path.stem}.png"
            target.write_bytes(figure)
            print(f"{path.name}: figure for the README in {target.relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

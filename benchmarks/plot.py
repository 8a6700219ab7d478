"""Regenerate the PNGs of a results folder from its JSON: ``python -m benchmarks.plot <results folder>``.

``attention.json`` gives one figure per (head dim, mode), a panel per N; ``model.json`` one figure per (suite, phase),
a panel per model. Time versus kept fraction, one line per provider (log scale).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as C  # noqa: E402


def plot_folder(folder: Path) -> list[Path]:
    paths = []
    if (folder / "attention.json").exists():
        paths += C.plot_time_vs_kept(C.load_results(folder / "attention.json"), folder, "attention")
    if (folder / "model.json").exists():
        paths += C.plot_time_vs_kept(
            C.load_results(folder / "model.json"), folder, "model", group_keys=("suite", "mode"), panel_key="model"
        )
    return paths


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, nargs="?", default=C.RESULTS_DIR / "latest")
    paths = plot_folder(parser.parse_args(argv).folder)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()

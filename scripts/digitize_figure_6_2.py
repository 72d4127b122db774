"""Read the thesis's figure 6.2 (left panel: train squared error against updates) at a few update counts.

The thesis gives no table of its final race, only figures. For the per-update comparison of chapter 07 (a
number of updates does not depend on the hardware, so a CPU race can be set beside the thesis's GPU race
there) this script reads each curve's height from the figure's pixels: every curve has its own colour
(matplotlib's default cycle), the axes are log-log, and their calibration comes from the figure's own grid
lines, which the script finds and checks before reading anything.

Usage:  python scripts/digitize_figure_6_2.py [PNG] [--out data/reference/thesis_figure_6_2.json]
PNG defaults to ../shared/thesis-figures/fig6.2-second-order-comparison.png (the figures of the thesis's final
version; not part of this repository). Precision: a curve is 2-3 pixels wide and a decade about 243 pixels
high, so a value is good to about ±2 % where the curve is drawn alone; where two curves overlap the script
reads the pixels of the one drawn last, and says so with "occluded" when a colour is missing at the column.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PNG = ROOT.parent / "shared" / "thesis-figures" / "fig6.2-second-order-comparison.png"
#: the curves' colours (matplotlib's default cycle, in the figure's legend order) → our method names
CURVES = {"acp": (31, 119, 180), "acp_fixed_alpha": (255, 127, 14), "natural_nn": (44, 160, 44),
          "kfac": (214, 39, 40), "batchnorm": (148, 103, 189), "sgd": (140, 86, 75)}
#: left panel of the 1729×867 image: pixel columns of the major grid lines at 10¹, 10³, 10⁵ updates, and
#: pixel rows of those at squared error 10², 10¹, 10⁰ (found by the checks in ``calibration``)
X_GRID = {1: 298.5, 3: 429.5, 5: 560.5}
Y_GRID = {2: 245.5, 1: 488.5, 0: 731.0}
PANEL_ROWS, PANEL_COLUMNS = (105, 770), (218, 605)
READ_AT = (1_000, 3_000, 10_000, 30_000, 100_000, 300_000)


def calibration(image: np.ndarray) -> None:
    """Check that the grid lines are where ``X_GRID`` and ``Y_GRID`` say (within one pixel)."""
    panel = image[slice(*PANEL_ROWS), slice(*PANEL_COLUMNS)].mean(-1)
    light = (panel > 210) & (panel < 240)                  # grid lines are lighter than the grey background
    columns = np.flatnonzero(panel.mean(0) > 215) + PANEL_COLUMNS[0]
    rows = np.flatnonzero(light.mean(1) > 0.9) + PANEL_ROWS[0]
    for name, wanted, found in (("column", X_GRID.values(), columns), ("row", Y_GRID.values(), rows)):
        for value in wanted:
            if not len(found) or np.abs(found - value).min() > 1.0:
                raise SystemExit(f"no grid {name} near pixel {value}: is this the thesis's figure 6.2? (found {found})")


def read_curves(image: np.ndarray, updates=READ_AT, tolerance: int = 60, half_width: int = 4) -> dict:
    decade_x = (X_GRID[5] - X_GRID[1]) / 4
    decade_y = (Y_GRID[0] - Y_GRID[2]) / 2
    values = {}
    for method, colour in CURVES.items():
        values[method] = {}
        for u in updates:
            x = int(round(X_GRID[3] + decade_x * (np.log10(u) - 3)))
            strip = image[slice(*PANEL_ROWS), x - half_width:x + half_width + 1]
            distance = np.abs(strip - np.array(colour)).sum(-1).min(1)
            rows = np.flatnonzero(distance < tolerance) + PANEL_ROWS[0]
            values[method][str(u)] = (round(float(10 ** ((Y_GRID[0] - rows.mean()) / decade_y)), 3)
                                      if len(rows) else "occluded")
    return values


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("png", nargs="?", default=str(DEFAULT_PNG))
    parser.add_argument("--out", default=str(ROOT / "data" / "reference" / "thesis_figure_6_2.json"))
    args = parser.parse_args(argv)
    image = (mpimg.imread(args.png)[..., :3] * 255).astype(int)
    if image.shape[:2] != (867, 1729):
        raise SystemExit(f"{args.png}: {image.shape[1]}×{image.shape[0]} pixels, expected 1729×867 (figure 6.2)")
    calibration(image)
    record = {"source": "thesis figure 6.2, left panel (train squared error against updates; Titan Black GPU, "
                        "minibatch 200, 3×10⁵ updates); read from the pixels by scripts/digitize_figure_6_2.py",
              "precision": "about ±2 % where a curve is drawn alone",
              "train_squared_error_at_updates": read_curves(image)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    for method, row in record["train_squared_error_at_updates"].items():
        print(f"{method:16s} " + "  ".join(f"{u}: {v}" for u, v in row.items()))


if __name__ == "__main__":
    main()

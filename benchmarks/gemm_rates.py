"""Multiply-add rate of each matrix product an update of the deep autoencoder makes (issue 11).

`optimizer_speed.py` finds ACP's and K-FAC's preconditioning slower than its FLOP count: its products run at a
lower rate than the forward and backward passes' products. This script times every product shape of one update
on its own, at the autoencoder's layer sizes and minibatch 200, so that the rates can be compared shape by shape:

* SGD's passes, per layer ``(n_in, n_out)``: forward ``[n, n_in]·[n_in, n_out]``, input gradient
  ``[n, n_out]·[n_out, n_in]``, weight gradient ``[n_out, n]·[n, n_in]``;
* ACP as ``fso_lib.optim.acp`` computes it: per layer the product order of ``acp_product_order`` (rows ``r`` = the
  minibatch's ``n`` in the "batch" order, ``n_out`` in the "gradient" order) and the inverse form of
  ``inverse_form`` (Woodbury with ``m`` statistics rows: ``[r, n_in]·[n_in, m]`` then ``[r, m]·[m, n_in]``; dense:
  ``[r, n_in]·[n_in, n_in]``), plus the weight-gradient product ``[n_out, n]·[n, n_in]``;
* K-FAC as ``fso_lib.optim.kfac`` computes ``G⁻¹ gᵀ [h 1] A⁻¹``: each side in the order of ``kfac_product_order``
  ("batch": the inverse applied to the n rows of ``g`` or ``[h 1]``; "gradient": to the formed product), plus the
  one product of the ``n``-long inner dimension that every order makes.

Each shape is timed as the median of ``--repeats`` runs of ``--inner`` products (float32, ``--threads``
threads), and reported as milliseconds per product and G multiply-adds per second. A product whose output is
small (``[n, m]`` with n = m = 200) and whose inner dimension is long does fewer multiply-adds per byte of
output written and parallelizes over fewer output tiles: the table shows what rate each shape reaches on the
machine at hand. Nothing is asserted; run it on an idle machine.

    python benchmarks/gemm_rates.py [--threads 2] [--batch 200] [--stats 200] [--out data/results/speed/gemm_rates.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from fso_lib.costs import update_products as shapes
from optimizer_speed import machine_description  # benchmarks/ is on the path when this script runs

def time_product(rows: int, inner: int, columns: int, inner_repeats: int, repeats: int) -> float:
    """Median seconds of one ``[rows, inner]·[inner, columns]`` product."""
    a, b = torch.randn(rows, inner), torch.randn(inner, columns)
    out = torch.empty(rows, columns)
    for _ in range(3):
        torch.mm(a, b, out=out)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner_repeats):
            torch.mm(a, b, out=out)
        samples.append((time.perf_counter() - started) / inner_repeats)
    return statistics.median(samples)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--stats", type=int, default=200, help="rows of ACP's statistics minibatch (m)")
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    results, totals = [], {}
    for group, name, (rows, inner, columns) in shapes(args.batch, args.stats):
        seconds = time_product(rows, inner, columns, args.inner, args.repeats)
        macs = rows * inner * columns
        results.append({"group": group, "product": name, "shape": [rows, inner, columns], "ms": 1e3 * seconds,
                        "gmac_per_s": macs / seconds / 1e9})
        total = totals.setdefault(group, [0.0, 0])
        total[0] += seconds
        total[1] += macs
    load_after = os.getloadavg()
    print(f"{'group':16s} {'product':44s} {'rows×inner×cols':>18s} {'ms':>7s} {'GMAC/s':>7s}")
    for r in results:
        print(f"{r['group']:16s} {r['product']:44s} {'×'.join(map(str, r['shape'])):>18s} {r['ms']:7.3f} {r['gmac_per_s']:7.1f}")
    summary = {group: {"ms": 1e3 * s, "gmac": macs / 1e9, "gmac_per_s": macs / s / 1e9} for group, (s, macs) in totals.items()}
    print()
    for group, row in summary.items():
        print(f"{group:16s} all layers: {row['gmac']:.3f} G multiply-adds in {row['ms']:.2f} ms = {row['gmac_per_s']:.1f} GMAC/s")
    print(f"load average {load_before[0]:.2f} → {load_after[0]:.2f}; {args.threads} threads; torch {torch.__version__}")
    record = {"results": results, "summary": summary, "threads": args.threads, "batch": args.batch,
              "stats_rows": args.stats, "load_average": [load_before[0], load_after[0]],
              "machine": machine_description()}
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=1, ensure_ascii=False)
    return record


if __name__ == "__main__":
    main()

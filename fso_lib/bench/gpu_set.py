"""Reading a GPU lease's run of the thesis's protocol (thesis §6.6, figure 6.2; issue 15).

``scripts/gpu_session.sh`` leaves, under ``data/results/gpu/``: ``smoke/smoke.json`` (every method alone on the GPU
for a few hundred updates: its uncontended time per update), ``device_check.txt`` (host reads in the steady-state
step) and ``full/*.jsonl`` (the protocol, every method at once on the one GPU, all under the same wall-clock cap).
The functions here turn these into rows for the book's tables; nothing is hard-coded but the thesis's own numbers.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .report import RESULTS_DIR, Run, load_runs, loss_at

#: The protocol's length (thesis §6.6): updates per method.
PROTOCOL_UPDATES = 300_000

#: Wall-clock seconds the thesis's methods took for the whole protocol on its Titan Black GPU (read from the
#: right panel of its figure 6.2, rounded as the issue quotes them).
THESIS_SECONDS = {"sgd": 1700.0, "acp": 4000.0, "kfac": 8000.0}


@dataclass
class GpuSet:
    """One GPU lease's results: the protocol's runs (``runs``) and the smoke pass (``smoke``, smoke.json)."""

    folder: Path
    runs: list[Run]
    smoke: dict

    @property
    def device_label(self) -> str:
        return self.runs[0].device_label if self.runs else f"GPU: {self.smoke['machine'].get('gpu', 'unknown')}"

    def smoke_row(self, method: str) -> dict | None:
        return next((r for r in self.smoke.get("results", []) if r["method"] == method), None)

    def alone_ms(self, method: str) -> float:
        """Milliseconds per update of ``method`` alone on the GPU: the smoke pass's second half (its first
        updates' one-off costs left out); NaN when the smoke pass has no such row."""
        row = self.smoke_row(method)
        if row is None or row.get("status") == "error":
            return math.nan
        return float(row.get("ms_per_update_second_half") or row["ms_per_update"])


def load_gpu_set(folder: str | Path = RESULTS_DIR / "gpu", task: str = "autoencoder") -> GpuSet | None:
    """The GPU set under ``folder`` (None when no protocol run is committed there)."""
    folder = Path(folder)
    runs = load_runs(folder / "full", task=task, recursive=False) if (folder / "full").exists() else []
    smoke_path = folder / "smoke" / "smoke.json"
    smoke = json.loads(smoke_path.read_text()) if smoke_path.exists() else {"results": [], "machine": {}}
    if not runs:
        return None
    return GpuSet(folder, runs, smoke)


def protocol_rows(gpu: GpuSet, labels: dict[str, str], protocol_updates: int = PROTOCOL_UPDATES) -> list[dict]:
    """Per method: how far it got under the common cap, its time per update shared and alone, and the time the
    whole protocol would take it alone on this GPU (updates × its time alone), beside the thesis's."""
    rows = []
    for run in gpu.runs:
        method, reached = run.method, int(run.updates[-1])
        alone = gpu.alone_ms(method)
        rows.append({"method": labels.get(method, method), "updates reached": reached,
                     "share of the protocol": reached / protocol_updates, "training s": float(run.times[-1]),
                     "ms/update, all at once": run.ms_per_update, "ms/update, alone": alone,
                     "protocol alone, s (projected)": alone * protocol_updates / 1e3,
                     "thesis, s (Titan Black)": THESIS_SECONDS.get(method, math.nan)})
    return rows


def per_update_rows(runs: list[Run], figure: dict[str, dict[int, float]], thesis_name, labels: dict[str, str]) -> list[dict]:
    """Ours against the thesis's figure 6.2 at each of its update counts that our run reached."""
    rows = []
    for run in runs:
        curve = figure.get(thesis_name(run.method))
        if not curve:
            continue
        for point, theirs in sorted(curve.items()):
            if point <= run.updates[-1]:
                ours = loss_at(run, point, "updates")
                rows.append({"method": labels.get(run.method, run.method), "updates": point, "ours": ours,
                             "thesis": theirs, "ours / thesis": ours / theirs})
    return rows


def same_seed_rows(gpu_runs: list[Run], cpu_runs: list[Run], points, labels: dict[str, str]) -> list[dict]:
    """The GPU run beside the CPU run of the same method, seed and hyperparameters, per update: the same
    initialization and minibatches, so the curves differ only by floating-point rounding (and what it grows
    into). Pairs whose settings differ (hyperparameters, initialization, data, minibatch) are skipped."""
    cpu = {(r.method, r.header["config"]["seed"]): r for r in cpu_runs}
    rows = []
    for run in gpu_runs:
        twin = cpu.get((run.method, run.header["config"]["seed"]))
        if twin is None or any(twin.header[key] != run.header[key]
                               for key in ("hyperparameters", "init", "init_scale", "n_train")) \
                or twin.header["config"]["batch_size"] != run.header["config"]["batch_size"]:
            continue
        for point in points:
            if point <= min(run.updates[-1], twin.updates[-1]):
                g, c = loss_at(run, point, "updates"), loss_at(twin, point, "updates")
                rows.append({"method": labels.get(run.method, run.method), "updates": point, "GPU": g, "CPU": c,
                             "relative gap": abs(g - c) / c})
    return rows


def on_alone_clock(gpu: GpuSet) -> list[Run]:
    """The protocol's runs with their time axis rebuilt as updates × the method's time per update alone on the GPU
    (:meth:`GpuSet.alone_ms`): what each curve's clock would have read had the method had the GPU to itself. An
    estimate: it assumes the smoke pass's time per update holds for the whole run."""
    return [replace(run, times=run.updates * gpu.alone_ms(run.method) / 1e3,
                    ms_per_update=gpu.alone_ms(run.method)) for run in gpu.runs]


def best_loss(run: Run, which: str = "test") -> dict:
    """The lowest ``which`` loss of a run, where it was reached (updates, seconds), and ``near_end``: whether that
    was in the last tenth of the run's updates, where a run cut by a cap may not have reached its best yet."""
    losses = run.test if which == "test" else run.train
    finite = np.where(np.isfinite(losses), losses, np.inf)
    index = int(np.argmin(finite))
    return {"loss": float(finite[index]), "updates": int(run.updates[index]), "seconds": float(run.times[index]),
            "near_end": bool(run.updates[index] >= 0.9 * run.updates[-1])}


def host_reads(gpu: GpuSet) -> dict[str, int]:
    """Host reads seen in each method's steady-state step on the GPU (``device_check.txt``, written by
    ``python -m fso_lib.bench.device_check``; summed over its lines, eager and compiled); empty when it did not run."""
    path = gpu.folder / "device_check.txt"
    reads = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        match = re.match(r"(\S+)\s+cuda\S*\s+compile=\S+\s+\d+ updates: (\d+) host reads", line)
        if match:
            reads[match.group(1)] = reads.get(match.group(1), 0) + int(match.group(2))  # eager and compiled lines
    return reads

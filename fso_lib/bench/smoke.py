"""A short pass over the benchmark's methods on one device, before a long run there (thesis §6.6).

``python -m fso_lib.bench.smoke --device cuda --updates 500 --hp-json data/results/race_cpu/tuned.json``

Each method trains the MNIST autoencoder for ``updates`` updates with its tuned hyperparameters, one method
after the other in one process (the data are loaded once; no run shares the device with another), so the
time per update it prints is the uncontended one. Evaluations at the middle and the end: the second
interval's milliseconds per update leave out the first updates' one-off costs (the first statistics
minibatch and inversion, cuBLAS's start-up). A method that fails is reported and the pass goes on.
The results go to ``OUT/smoke.json`` together with the machine, torch and its float32 settings (TF32).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .methods import RACE_METHODS
from .runner import RunConfig, machine_info, run, versions
from .tasks import make_task


def float32_settings() -> dict:
    """Whether float32 matrix products may use TF32 on this device (they change results, not only speed)."""
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}


def read_tuned(path: str | None, task: str) -> dict:
    """``{method: hyperparameters}`` from a tuned-hyperparameters file (``{task: {method: {...}}}`` or flat)."""
    if path is None:
        return {}
    table = json.loads(Path(path).read_text())
    return dict(table.get(task, table))


def smoke_one(method: str, task, device: str, updates: int, params: dict, seed: int, out_dir: Path) -> dict:
    hp = dict(params)
    init, init_scale = hp.pop("init", None), hp.pop("init_scale", None)
    config = RunConfig(task=task.name, method=method, hyperparameters=hp, init=init, init_scale=init_scale,
                       max_updates=updates, eval_every=max(updates // 2, 1), eval_schedule="linear", seed=seed,
                       device=device, progress=False, name=f"smoke-{method}", note="fso_lib.bench.smoke")
    started = time.perf_counter()
    try:
        result = run(config, out_dir, task=task)
    except Exception as exc:  # noqa: BLE001 - reported; the pass goes on with the next method
        return {"method": method, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:500],
                "wall_s": time.perf_counter() - started}
    evals = [r for r in result.records if r.get("type") == "eval"]
    return {"method": method, "status": result.status, "updates": result.updates, "train_s": result.seconds,
            "wall_s": time.perf_counter() - started, "ms_per_update": result.seconds / max(result.updates, 1) * 1e3,
            "ms_per_update_second_half": evals[-1].get("ms_per_update") if len(evals) > 1 else None,
            "train_loss": result.train_loss, "tuned": bool(params)}


def smoke(methods, device: str, updates: int, tuned: dict, out_dir: str | Path, seed: int = 1,
          task_name: str = "autoencoder", sample: bool | None = None) -> list[dict]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = make_task(task_name, sample=sample)
    summary_path = out_dir / "smoke.json"
    summary = {"device": device, "machine": machine_info(torch.device(device)), "versions": versions(),
               "float32": float32_settings(), "updates": updates, "seed": seed, "results": []}
    print(f"{'method':22s} {'status':10s} {'ms/update':>10s} {'2nd half':>9s} {'train SE':>9s} {'wall s':>7s}", flush=True)
    for method in methods:
        row = smoke_one(method, task, device, updates, tuned.get(method, {}), seed, out_dir)
        summary["results"].append(row)
        summary_path.write_text(json.dumps(summary, indent=1))  # after every method: a cut pass keeps its rows
        if row["status"] == "error":
            print(f"{method:22s} error      {row['error']}", flush=True)
            continue
        half = row["ms_per_update_second_half"]
        print(f"{method:22s} {row['status']:10s} {row['ms_per_update']:10.2f} "
              f"{'—' if half is None else f'{half:.2f}':>9s} {row['train_loss']:9.3f} {row['wall_s']:7.1f}", flush=True)
    return summary["results"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(RACE_METHODS[:11]))
    parser.add_argument("--updates", type=int, default=500)
    parser.add_argument("--device", default=None, help="default: fso_lib.config.get_device()")
    parser.add_argument("--hp-json", default=None, help="tuned hyperparameters ({task: {method: {...}}})")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sample", action="store_true", help="the 1,000-image MNIST sample (a dry run)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from ..config import get_device

    device = str(get_device(args.device))
    results = smoke(args.methods, device, args.updates, read_tuned(args.hp_json, "autoencoder"), args.out,
                    seed=args.seed, sample=True if args.sample else None)
    return 1 if any(r["status"] == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

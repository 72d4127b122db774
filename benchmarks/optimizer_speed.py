"""Wall-clock cost of one update of each chapter-6 optimizer on the deep autoencoder (thesis §6.6).

Every optimizer trains its own copy of the 784-1000-500-250-30-250-500-1000-784 autoencoder on the
same minibatches (size 200 by default), in one process. Updates are timed in windows of ``--window``
updates (default 100: each window holds exactly one inversion of the amortized methods, N = 100, and ten
K-FAC statistics passes), the optimizers *interleaved* update by update (round robin, so that a change in
the machine's load hits them all alike), for ``--rounds`` rounds. Printed per optimizer:

* ``median ms``: the median over all timed updates of one update's time (the steady state);
* ``amortized ms``: total time / total updates, including the statistics minibatches and inversions;
* ``× SGD``: the amortized time over SGD's, computed round by round (same round, same load), then the median;
* the breakdown of the amortized time: ``forward`` (model and loss), ``backward`` (``loss.backward()``),
  ``precondition`` (``opt.step()`` on updates that invert nothing), ``statistics`` (``update_statistics``,
  amortized), ``inversion`` (the extra time of the steps that refresh an inverse, amortized).

``*_autograd_grads`` rows run the same optimizer with ``weight_grads=True``: autograd forms every weight
gradient as before the optimizers learned to skip it, so the two rows show what skipping it saves.
``*_sync_free`` rows use ``check_every=None`` (no host read in the step; the non-finite mask costs one more pass).
``--before COMMIT`` adds a ``before:NAME`` row per optimizer, built by ``fso_lib.optim`` as of that git commit
(extracted with ``git archive`` into a temporary folder and imported under another name), timed in the
same process and interleaved with the others.
The FLOP count of the preconditioning (benchmark facts) puts ACP at ≈1.4× and K-FAC at ≈1.8× an SGD
step at minibatch 200. Performance is printed (and written with ``--out``), never asserted.

    python benchmarks/optimizer_speed.py [--threads 2] [--batch 200] [--window 100] [--rounds 3]
        [--only sgd,acp,kfac] [--out data/results/speed/optimizer_speed.json] [--before COMMIT] [--device cuda]

On a GPU (``--device cuda``) every phase boundary waits for the device (``torch.cuda.synchronize``), so that each
phase's time is the device's and not the launch's: the breakdown is right, and the totals lose what overlapping
the host's launches with the device's work would save (a step of the training loop never synchronizes).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from fso_lib.bench.runner import CODE_REVISION
from fso_lib.models import deep_autoencoder
from fso_lib.optim import make_optimizer, needs_statistics, prepare_model

#: name → (registry name, hyperparameters); the amortization of the thesis's §6.6 (N = 100)
CONFIGS = {
    "sgd": ("sgd", dict(lr=0.05)),
    "adam": ("adam", dict(lr=1e-3)),
    "centered_gd": ("centered_gd", dict(lr=0.05)),
    "centered_gd_autograd_grads": ("centered_gd", dict(lr=0.05, weight_grads=True)),
    "mean_only_batchnorm": ("mean_only_batchnorm", dict(lr=0.05)),
    "batchnorm": ("batchnorm", dict(lr=0.05)),
    "acp": ("acp", dict(lr=0.01, amortization_period=100)),
    "acp_autograd_grads": ("acp", dict(lr=0.01, amortization_period=100, weight_grads=True)),
    "acp_fixed_alpha": ("acp_fixed_alpha", dict(lr=0.01, amortization_period=100)),
    "kfac": ("kfac", dict(lr=0.01, statistics_period=10, inverse_period=100)),
    "kfac_autograd_grads": ("kfac", dict(lr=0.01, statistics_period=10, inverse_period=100, weight_grads=True)),
    "kfac_stats_every_step": ("kfac", dict(lr=0.01, statistics_period=1, inverse_period=20)),
    "acp_sync_free": ("acp", dict(lr=0.01, amortization_period=100, check_every=None)),
    "kfac_sync_free": ("kfac", dict(lr=0.01, statistics_period=10, inverse_period=100, check_every=None)),
    "natural_nn": ("natural_nn", dict(lr=0.01, amortization_period=100)),
    "natural_nn_implicit": ("natural_nn_implicit", dict(lr=0.01, amortization_period=100)),
    "acp_dense_inverse": ("acp", dict(lr=0.01, amortization_period=100, inverse_form="dense")),
    # Martens & Grosse's §7 step (α, μ from the exact-Fisher model; lr unused), F from all 200 / the first 50 examples
    "kfac_quadratic_model": ("kfac", dict(statistics_period=10, inverse_period=100, step_rule="quadratic_model")),
    "kfac_quadratic_model_50": ("kfac", dict(statistics_period=10, inverse_period=100, step_rule="quadratic_model",
                                             quadratic_model_examples=50)),
    # the same rule offered to ACP and the implicit natural neural network (fso_lib.bench methods *_quadratic_model)
    "acp_quadratic_model": ("acp", dict(amortization_period=100, step_rule="quadratic_model")),
    "natural_nn_quadratic_model": ("natural_nn_implicit", dict(amortization_period=100, step_rule="quadratic_model")),
    # after the thesis (issue 14), with the registry's defaults (EKFAC: K-FAC's schedule, s re-estimated every 10)
    "ekfac": ("ekfac", dict()),
    "shampoo": ("shampoo", dict()),
    "soap": ("soap", dict()),
    # the same with the race's amortization (fso_lib.bench.methods.AFTER_THESIS_RACE_AMORTIZATION): every 100 updates
    "shampoo_period_100": ("shampoo", dict(root_period=100)),
    "soap_period_100": ("soap", dict(eigenbasis_period=100)),
    # the steady-state step compiled by torch.compile (LayerwiseOptimizer.compile_step; inductor needs a C++ compiler
    # on a CPU), sync-free so that every step runs the compiled code: compare with the *_sync_free rows
    "acp_compiled": ("acp", dict(lr=0.01, amortization_period=100, check_every=None, compile=True)),
    "kfac_compiled": ("kfac", dict(lr=0.01, statistics_period=10, inverse_period=100, check_every=None, compile=True)),
    "natural_nn_implicit_sync_free": ("natural_nn_implicit", dict(lr=0.01, amortization_period=100, check_every=None)),
    "natural_nn_implicit_compiled": ("natural_nn_implicit", dict(lr=0.01, amortization_period=100, check_every=None,
                                                                 compile=True)),
    # fso_lib.optim.kfac.KFAC_THESIS_PROTOCOL: statistics and inverses every 100 updates, no running average
    "kfac_thesis_protocol": ("kfac", dict(lr=0.01, statistics_period=100, inverse_period=100, running_average=0.0)),
}
PHASES = ("forward", "backward", "precondition", "statistics", "inversion")


def squared_error(output, target):
    return (output - target).square().sum(dim=1).mean()


def _refreshes(opt) -> bool:
    """Whether the next step of ``opt`` recomputes an inverse (read before the step)."""
    period = (getattr(opt, "inverse_period", None) or getattr(opt, "amortization_period", None)
              or getattr(opt, "root_period", None) or getattr(opt, "eigenbasis_period", None))
    if period is None or not hasattr(opt, "n_updates"):
        return False
    if hasattr(opt, "inverse_period") or hasattr(opt, "root_period") or hasattr(opt, "eigenbasis_period"):
        return opt.n_updates % period == 0  # Shampoo's roots, SOAP's eigenbases: at the steps of their period
    # ACP inverts at the first step after each statistics update; NNN re-whitens inside update_statistics
    return opt.n_updates % period == 0 and type(opt).__name__ == "ACP"


def _optim_at_commit(commit: str):
    """``fso_lib.optim`` as of ``commit``, imported as the package ``fso_before`` from a ``git archive``."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "archive", commit, "fso_lib"], cwd=root, capture_output=True, check=True).stdout
    folder = tempfile.mkdtemp(prefix="fso_before_")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    os.rename(os.path.join(folder, "fso_lib"), os.path.join(folder, "fso_before"))
    sys.path.insert(0, folder)
    return importlib.import_module("fso_before.optim")


def machine_description(device: torch.device) -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    description = {"cpu": model, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
                   "python": platform.python_version(), "torch": torch.__version__}
    if device.type == "cuda":
        description.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                           allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return description


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--only", type=str, default=None, help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--out", type=str, default=None, help="write the results as JSON to this path")
    parser.add_argument("--before", type=str, default=None, metavar="COMMIT",
                        help="also time every optimizer of --only as implemented at this git commit")
    parser.add_argument("--device", type=str, default="cpu", help="cpu or cuda (see the docstring on timing a GPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu.")

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as every benchmark run does (fso_lib.bench.RunConfig.flush_denormal)
    names = args.only.split(",") if args.only else list(CONFIGS)
    if "sgd" not in names:
        names.insert(0, "sgd")
    torch.manual_seed(0)
    data = torch.rand(4 * args.batch, 784).to(device)  # the cost does not depend on the pixel values
    load_before = os.getloadavg()

    libraries = {"": (prepare_model, make_optimizer)}
    if args.before:
        old = _optim_at_commit(args.before)
        libraries["before:"] = (old.prepare_model, old.make_optimizer)
    runs = {}
    for name in names:
        for prefix, (prepare, make) in libraries.items():
            registry_name, hyper = CONFIGS[name]
            hyper = dict(hyper)
            compiled = hyper.pop("compile", False)
            new_options = ("weight_grads", "check_every", "inverse_form", "step_rule", "damping_adaptation",
                           "quadratic_model_examples", "running_average")
            if prefix and (name == "sgd" or registry_name == "natural_nn_implicit" or any(o in hyper for o in new_options)):
                continue  # torch's SGD did not change; weight_grads and check_every did not exist before
            model = prepare(registry_name, deep_autoencoder(seed=0)).to(device)
            opt = make(registry_name, model, **hyper)
            if compiled:
                opt.compile_step()  # compiled at its first steps, inside the warm-up (untimed)
            runs[prefix + name] = dict(model=model, opt=opt, k=0, config=name, rounds=[], times=[])

    def update(run, record: bool):
        k = run["k"]
        x = data[(k % 4) * args.batch:(k % 4 + 1) * args.batch]
        opt, model = run["opt"], run["model"]
        t0 = now()
        if needs_statistics(opt):
            opt.update_statistics(data[((k + 2) % 4) * args.batch:((k + 2) % 4 + 1) * args.batch])
        t1 = now()
        opt.zero_grad()
        loss = squared_error(model(x), x)
        t2 = now()
        loss.backward()
        t3 = now()
        refresh = _refreshes(opt)
        if getattr(opt, "wants_minibatch_loss", False):  # K-FAC's damping adaptation measures the loss after its step
            opt.step(minibatch_loss=lambda: squared_error(model(x), x), loss=loss.detach())
        else:
            opt.step()
        t4 = now()
        run["k"] = k + 1
        if record:
            run["times"].append(dict(statistics=t1 - t0, forward=t2 - t1, backward=t3 - t2, step=t4 - t3,
                                     total=t4 - t0, refresh=refresh))

    for run in runs.values():
        for _ in range(args.warmup):
            update(run, record=False)
    for _ in range(args.rounds):
        first = {name: len(run["times"]) for name, run in runs.items()}
        for _ in range(args.window):
            for run in runs.values():  # round robin, update by update: a change of load hits every method alike
                update(run, record=True)
        for name, run in runs.items():
            run["rounds"].append(sum(t["total"] for t in run["times"][first[name]:]) / args.window)
    load_after = os.getloadavg()

    sgd_rounds = runs["sgd"]["rounds"]
    results = {}
    for name, run in runs.items():
        times = run["times"]
        n = len(times)
        plain_steps = [t["step"] for t in times if not t["refresh"]]
        plain_step = statistics.mean(plain_steps) if plain_steps else 0.0
        breakdown = {
            "forward": sum(t["forward"] for t in times) / n,
            "backward": sum(t["backward"] for t in times) / n,
            "precondition": plain_step,
            "statistics": sum(t["statistics"] for t in times) / n,
            "inversion": sum(t["step"] - plain_step for t in times if t["refresh"]) / n,
        }
        ratios = [w / s for w, s in zip(run["rounds"], sgd_rounds)]
        results[name] = {
            "registry_name": CONFIGS[run["config"]][0],
            "hyperparameters": CONFIGS[run["config"]][1],
            "code": f"git commit {args.before}" if name.startswith("before:") else "this working tree",
            "median_update_ms": 1e3 * statistics.median(t["total"] for t in times),
            "amortized_ms": 1e3 * sum(run["rounds"]) / len(run["rounds"]),
            "ratio_to_sgd_amortized": statistics.median(ratios),
            "ratio_to_sgd_per_round": ratios,
            "breakdown_ms": {phase: 1e3 * value for phase, value in breakdown.items()},
            "refreshes_timed": sum(t["refresh"] for t in times),
        }

    print(f"deep autoencoder, minibatch {args.batch}, {args.rounds} rounds × {args.window} updates, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_before[0]:.2f} → {load_after[0]:.2f}")
    print(f"{'optimizer':<36}{'median ms':>10}{'amortized':>10}{'× SGD':>7} |" + "".join(f"{p[:12]:>13}" for p in PHASES))
    for name, r in results.items():
        print(f"{name:<36}{r['median_update_ms']:>10.1f}{r['amortized_ms']:>10.1f}{r['ratio_to_sgd_amortized']:>7.2f} |"
              + "".join(f"{r['breakdown_ms'][p]:>13.2f}" for p in PHASES))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": "benchmarks/optimizer_speed.py",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_description(device), "device": str(device),
            "threads": torch.get_num_threads(),
            "batch": args.batch, "window": args.window, "rounds": args.rounds, "warmup": args.warmup,
            "code": CODE_REVISION, "before_commit": args.before, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "flush_denormal": True,
            "load_average_1min": {"before": load_before[0], "after": load_after[0]},
            "units": "milliseconds per update; ratios are median over rounds of (amortized ms / SGD's amortized ms)",
            "results": results,
        }
        out.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()

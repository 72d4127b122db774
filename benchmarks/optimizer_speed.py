"""Wall-clock cost of one update of each chapter-6 optimizer on the deep autoencoder (thesis §6.6).

Every optimizer trains its own copy of the 784-1000-500-250-30-250-500-1000-784 autoencoder on the
same minibatches (size 200 by default). Updates are timed in windows of ``--window`` updates,
the optimizers *interleaved* window by window (so that a change in the machine's load hits them
all alike), for ``--rounds`` rounds. Printed per optimizer:

* ``median ms``: the median over rounds of the mean time per update in a window (the steady state);
* ``amortized ms``: total time / total updates, including the statistics minibatches and inversions
  that fall every N updates;
* the ratio of each to SGD, computed round by round (same round, same load) and then the median.

The FLOP count of the preconditioning (benchmarks facts) puts ACP at ≈1.4× and K-FAC at ≈1.8× an SGD
step at minibatch 200 when the products are ordered well. Performance is printed, never asserted.

    python benchmarks/optimizer_speed.py [--batch 200] [--window 10] [--rounds 7] [--only sgd,acp,kfac]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fso_lib.models import deep_autoencoder
from fso_lib.optim import make_optimizer, needs_statistics, prepare_model

#: name → (registry name, hyperparameters); the amortization of the thesis's §6.6 (N = 100)
CONFIGS = {
    "sgd": ("sgd", dict(lr=0.05)),
    "adam": ("adam", dict(lr=1e-3)),
    "centered_gd": ("centered_gd", dict(lr=0.05)),
    "mean_only_batchnorm": ("mean_only_batchnorm", dict(lr=0.05)),
    "batchnorm": ("batchnorm", dict(lr=0.05)),
    "acp": ("acp", dict(lr=0.01, amortization_period=100)),
    "acp_fixed_alpha": ("acp_fixed_alpha", dict(lr=0.01, amortization_period=100)),
    "kfac": ("kfac", dict(lr=0.01, statistics_period=10, inverse_period=100)),
    "kfac_stats_every_step": ("kfac", dict(lr=0.01, statistics_period=1, inverse_period=20)),
    "natural_nn": ("natural_nn", dict(lr=0.01, amortization_period=100)),
}


def squared_error(output, target):
    return (output - target).square().sum(dim=1).mean()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--only", type=str, default=None, help="comma-separated subset of " + ",".join(CONFIGS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else list(CONFIGS)
    if "sgd" not in names:
        names.insert(0, "sgd")
    torch.manual_seed(0)
    data = torch.rand(4 * args.batch, 784)  # the cost does not depend on the pixel values

    runs = {}
    for name in names:
        registry_name, hyper = CONFIGS[name]
        model = prepare_model(registry_name, deep_autoencoder(seed=0))
        runs[name] = dict(model=model, opt=make_optimizer(registry_name, model, **hyper), k=0, windows=[], total=0.0, updates=0)

    def update(run):
        k = run["k"]
        x = data[(k % 4) * args.batch:(k % 4 + 1) * args.batch]
        opt, model = run["opt"], run["model"]
        if needs_statistics(opt):
            opt.update_statistics(data[((k + 2) % 4) * args.batch:((k + 2) % 4 + 1) * args.batch])
        opt.zero_grad()
        squared_error(model(x), x).backward()
        opt.step()
        run["k"] = k + 1

    for run in runs.values():
        for _ in range(args.warmup):
            update(run)
    for _ in range(args.rounds):
        for run in runs.values():
            start = time.perf_counter()
            for _ in range(args.window):
                update(run)
            elapsed = time.perf_counter() - start
            run["windows"].append(elapsed / args.window)
            run["total"] += elapsed
            run["updates"] += args.window

    sgd = runs["sgd"]["windows"]
    print(f"deep autoencoder, minibatch {args.batch}, {args.rounds} rounds × {args.window} updates, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'optimizer':<24}{'median ms':>10}{'× SGD':>8}{'amortized ms':>14}{'× SGD':>8}")
    sgd_amortized = runs["sgd"]["total"] / runs["sgd"]["updates"]
    for name, run in runs.items():
        ratio = statistics.median(w / s for w, s in zip(run["windows"], sgd))
        amortized = run["total"] / run["updates"]
        print(f"{name:<24}{1e3 * statistics.median(run['windows']):>10.1f}{ratio:>8.2f}"
              f"{1e3 * amortized:>14.1f}{amortized / sgd_amortized:>8.2f}")


if __name__ == "__main__":
    main()

"""The curvature of the deep autoencoder by Lanczos (issue 14; thesis §3.1.2, §6.3; notebook 06e).

Three experiments on the benchmark's deep autoencoder (``fso_lib.models.deep_autoencoder``, 2.8 M parameters,
Martens' sparse initialization, seed 0), the loss ``‖f(x) − x‖²`` summed over pixels and averaged over images,
every curvature taken on one fixed batch: the first ``--curvature-images`` training images of MNIST.

* ``training``: SGD and ACP train (minibatch 200, data order seed 0; hyperparameters from
  ``data/results/tuned_cpu.json``, the CPU race's tuned values); at the updates ``--points`` the top ``--k``
  eigenvalues of the Gauss-Newton matrix and of the Hessian, and the smallest eigenvalue of the Hessian.
* ``eos``: gradient descent on the fixed batch (the "full batch") at each step size of ``--eos-lrs``;
  every ``--eos-every`` steps the Hessian's largest eigenvalue, to compare with 2/η (Cohen et al. 2021).
* ``preconditioned``: at one point of SGD's run, the top ``--k-preconditioned`` eigenvalues of
  ``G_GN`` and of ``P^{-1/2} G_GN P^{-1/2}`` for K-FAC's and ACP's ``P``, whose factors are estimated on the
  same fixed batch; ``trace``: Hutchinson estimates (``--trace-probes`` Rademacher probes) of the traces of the
  same three operators, i.e. their mean eigenvalues.
* ``blocks``: at the same ``--points`` of the same SGD and ACP runs (replayed), for each of the 8 linear layers, the
  relative Frobenius errors ``‖F̃ − F‖_F / ‖F‖_F`` of K-FAC's, ACP's and EKFAC's blocks to the layer's exact GN block
  ``F`` (eq. 6.3.2) on the first ``--block-images`` training images, with the exact per-example factors
  ``B_i = J_aᵀ (2I) J_a`` from the backward recursion (``fso_lib.kron.sequential_backward_factors``) and the errors
  from Gram matrices of the examples (``fso_lib.kron.relative_errors_matrix_free``), in float64; no block is formed.

Writes JSON lines to ``OUT/spectrum.jsonl`` as it goes (one record per measurement); a rerun skips the
measurements already there (training is deterministic and is replayed; an unfinished GD run is restarted).
Run it on one thread: ``OMP_NUM_THREADS=1 nice -n 5 python scripts/autoencoder_spectrum.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fso_lib.curvature import parameter_layout  # noqa: E402
from fso_lib.data import load_mnist  # noqa: E402
from fso_lib.kron import relative_errors_matrix_free, sequential_backward_factors  # noqa: E402
from fso_lib.losses import SquaredError  # noqa: E402
from fso_lib.matrix_free import CurvatureProducts  # noqa: E402
from fso_lib.models import deep_autoencoder, linear_layers  # noqa: E402
from fso_lib.optim import ACP, KFAC  # noqa: E402
from fso_lib.spectrum import (  # noqa: E402
    acp_preconditioner, hutchinson_trace, kfac_preconditioner, lanczos, preconditioned_operator,
)
from fso_lib.training import minibatches  # noqa: E402

LOSS = SquaredError()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "data/results/spectrum"))
    p.add_argument("--stages", default="training,eos,preconditioned,trace,blocks", help="comma-separated, run in this order")
    p.add_argument("--curvature-images", type=int, default=1000)
    p.add_argument("--points", default="0,500,3000")
    p.add_argument("--methods", default="sgd,acp")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--iterations", type=int, default=40, help="Lanczos iterations at most (top-k)")
    p.add_argument("--tol", type=float, default=1e-3, help="relative residual for convergence")
    p.add_argument("--eos-lrs", default="0.01,0.02,0.04")
    p.add_argument("--eos-steps", type=int, default=300)
    p.add_argument("--eos-every", type=int, default=10)
    p.add_argument("--eos-iterations", type=int, default=12)
    p.add_argument("--preconditioned-point", type=int, default=500, help="SGD update at which (c) is measured")
    p.add_argument("--k-preconditioned", type=int, default=20)
    p.add_argument("--iterations-preconditioned", type=int, default=60)
    p.add_argument("--trace-probes", type=int, default=20, help="Hutchinson probes per operator (stage trace)")
    p.add_argument("--block-images", type=int, default=200, help="examples of the exact layer blocks (stage blocks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


class Log:
    """Append-only JSON lines; ``done`` holds the keys already measured."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        self.done = {r["key"] for r in self.records if "key" in r}

    def write(self, record: dict) -> None:
        record = {**record, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if "key" in record:
            self.done.add(record["key"])
        print(json.dumps(record)[:300], flush=True)


def tuned(method: str) -> dict:
    hp = json.loads((ROOT / "data/results/tuned_cpu.json").read_text())["autoencoder"][method]
    return {k: v for k, v in hp.items() if k not in ("init", "init_scale")}


def spectrum(products: CurvatureProducts, which_product: str, k: int, iterations: int, tol: float, seed: int,
             which: str = "largest", start=None, return_eigenvectors=False):
    matvec = getattr(products, which_product)
    if which == "smallest":
        result = lanczos(lambda v: -matvec(v), products.theta.numel(), k=k, max_iterations=iterations, tol=tol,
                         seed=seed, operator_dtype=products.theta.dtype, start=start)
        result.eigenvalues = -result.eigenvalues
        return result
    return lanczos(matvec, products.theta.numel(), k=k, max_iterations=iterations, tol=tol, seed=seed, which=which,
                   operator_dtype=products.theta.dtype, start=start, return_eigenvectors=return_eigenvectors)


def measure_point(log: Log, args, model, x, method: str, update: int, train_loss: float | None) -> None:
    products = CurvatureProducts(model, LOSS, x, x)
    risk = float(products.risk())
    for name, product, which, k in (("gauss_newton", "gauss_newton_vector_product", "largest", args.k),
                                    ("hessian", "hessian_vector_product", "largest", args.k),
                                    ("hessian_smallest", "hessian_vector_product", "smallest", 1)):
        key = f"training/{method}/{update}/{name}"
        if key in log.done:
            continue
        start = time.process_time()
        result = spectrum(products, product, k, args.iterations, args.tol, args.seed, which=which)
        log.write({"key": key, "kind": "training", "method": method, "update": update, "matrix": name,
                   "curvature_batch_loss": risk, "last_minibatch_loss": train_loss, **result.as_dict(),
                   "cpu_s": time.process_time() - start})


def replay_training(args, data, method: str, points: list[int]):
    """SGD's or ACP's run (tuned hyperparameters, minibatch ``--batch-size``, data order seed ``--seed``), replayed
    deterministically: yields ``(update, model, last_minibatch_loss)`` at each update of ``points`` (the model before
    that update), stops after the last one. The model must not be changed by the consumer."""
    points = sorted(points)
    model = deep_autoencoder(init="sparse", seed=args.seed)
    hp = tuned(method)
    if method == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=hp["lr"])
    elif method == "acp":
        optimizer = ACP(model, lr=hp["lr"], damping=hp["damping"], alpha=None, amortization_period=100)
    else:
        raise ValueError(f"unknown method {method}")
    batches = minibatches(len(data), args.batch_size, torch.Generator().manual_seed(args.seed))
    statistics = minibatches(len(data), args.batch_size, torch.Generator().manual_seed(args.seed + 1000))
    last_loss = None
    try:
        for update in range(points[-1] + 1):
            if update in points:
                yield update, model, last_loss
            if update == points[-1]:
                break
            x = data[next(batches)]
            if method == "acp" and optimizer.needs_statistics():
                optimizer.update_statistics(data[next(statistics)])
            optimizer.zero_grad(set_to_none=True)
            loss = LOSS(model(x), x)
            loss.backward()
            optimizer.step()
            last_loss = float(loss.detach())
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"{method} diverged at update {update}")
    finally:
        if isinstance(optimizer, ACP):
            optimizer.remove_hooks()


def run_training(log: Log, args, data) -> None:
    points = sorted(int(p) for p in args.points.split(","))
    x_curv = data[: args.curvature_images]
    for method in args.methods.split(","):
        keys = [f"training/{method}/{u}/{m}" for u in points for m in ("gauss_newton", "hessian", "hessian_smallest")]
        if all(key in log.done for key in keys):
            continue
        log.write({"kind": "training_config", "method": method, "hyperparameters": tuned(method),
                   "source": "data/results/tuned_cpu.json (CPU race of 2026-11-27, tuned on 300 updates)"})
        for update, model, last_loss in replay_training(args, data, method, points):
            measure_point(log, args, model, x_curv, method, update, last_loss)


def measure_blocks(log: Log, args, model, x, method: str, update: int, train_loss: float | None) -> None:
    """Relative Frobenius errors of K-FAC's, ACP's and EKFAC's blocks to each linear layer's exact GN block."""
    n_layers = len(linear_layers(model))
    with torch.no_grad():   # each module's forward, not model(x): no optimizer hook sees this batch
        output = x
        for module in model:
            output = module.forward(output)
        batch_loss = float(LOSS(output, x))
    start = time.process_time()
    # the exact per-example B_i = J_aᵀ D J_a (D = 2I, the squared error's output Hessian) of every layer, last first
    for index, h, b in sequential_backward_factors(model, x, LOSS, x, dtype=torch.float64):
        key = f"blocks/{method}/{update}/{index}"
        if key not in log.done:
            n_in, n_out = h.shape[1], b.shape[1]
            alpha = float(torch.diagonal(b, dim1=1, dim2=2).mean())   # tr(B̄)/n_out: ACP's block with K-FAC's trace
            result = relative_errors_matrix_free(h, b, alpha=alpha, with_exact_norm=True)
            log.write({"key": key, "kind": "blocks", "method": method, "update": update, "layer": index,
                       "n_layers": n_layers, "n_in": n_in, "n_out": n_out, "block_size": (n_in + 1) * n_out,
                       "n_examples": len(x), "examples": f"training images 0..{len(x) - 1}",
                       "errors": {k: result[k] for k in ("ekfac", "kfac", "acp")},
                       "exact_frobenius_norm": result["exact_norm"], "acp_alpha": alpha,
                       "block_batch_loss": batch_loss, "last_minibatch_loss": train_loss,
                       "cpu_s": time.process_time() - start})
        del h, b
        start = time.process_time()


def run_blocks(log: Log, args, data) -> None:
    """At the training points of SGD's and ACP's runs (replayed), the Frobenius errors of every layer's block."""
    points = sorted(int(p) for p in args.points.split(","))
    x_blocks = data[: args.block_images]
    n_layers = len(linear_layers(deep_autoencoder(init="sparse", seed=args.seed)))
    for method in args.methods.split(","):
        missing = [u for u in points if any(f"blocks/{method}/{u}/{k}" not in log.done for k in range(n_layers))]
        if not missing:
            continue
        for update, model, last_loss in replay_training(args, data, method, missing):
            measure_blocks(log, args, model, x_blocks, method, update, last_loss)


def run_eos(log: Log, args, data) -> None:
    x = data[: args.curvature_images]
    for lr in (float(v) for v in args.eos_lrs.split(",")):
        done_key = f"eos/{lr}/done"
        if done_key in log.done:
            continue
        attempt = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        model = deep_autoencoder(init="sparse", seed=args.seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        start = None
        losses = []
        for step in range(args.eos_steps + 1):
            if step % args.eos_every == 0:
                products = CurvatureProducts(model, LOSS, x, x)
                cpu = time.process_time()
                # warm start from the previous top Ritz vector: the top eigenvector moves slowly between measurements
                result = spectrum(products, "hessian_vector_product", 1, args.eos_iterations, args.tol, args.seed,
                                  start=start, return_eigenvectors=True)
                start = result.eigenvectors[:, 0].clone()
                log.write({"key": f"eos/{lr}/{attempt}/{step}", "kind": "eos", "lr": lr, "attempt": attempt,
                           "step": step, "loss": float(products.risk()), "two_over_lr": 2.0 / lr,
                           "lambda_max": float(result.eigenvalues[0]), "residual": float(result.residual_norms[0]),
                           "n_products": result.n_products, "losses_since_last": losses,
                           "cpu_s": time.process_time() - cpu})
                losses = []
            if step == args.eos_steps:
                break
            optimizer.zero_grad(set_to_none=True)
            loss = LOSS(model(x), x)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if not torch.isfinite(loss.detach()):
                log.write({"key": f"eos/{lr}/{attempt}/diverged", "kind": "eos_diverged", "lr": lr,
                           "attempt": attempt, "step": step})
                break
        log.write({"key": done_key, "kind": "eos_done", "lr": lr, "attempt": attempt})


def _layer_inputs_and_gradients(model, layers, x):
    """Inputs ``h`` and per-example pre-activation gradients ``∂l_i/∂a`` of each layer on the batch ``x``."""
    inputs, outputs = {}, {}

    def record(k):
        def hook(module, args, out):
            inputs[k], outputs[k] = args[0].detach(), out
        return hook

    handles = [layer.register_forward_hook(record(k)) for k, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            out = model(x)
            loss = LOSS.per_example(out, x).sum()  # per-example gradients: the sum, not the mean
            grads = torch.autograd.grad(loss, [outputs[k] for k in range(len(layers))])
    finally:
        for handle in handles:
            handle.remove()
    return [inputs[k] for k in range(len(layers))], grads


def _preconditioned_operators(args, data):
    """SGD's network at ``--preconditioned-point`` (its run replayed) and the three symmetric operators of (c)."""
    point = args.preconditioned_point
    x_curv = data[: args.curvature_images]
    model = deep_autoencoder(init="sparse", seed=args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=tuned("sgd")["lr"])
    batches = minibatches(len(data), args.batch_size, torch.Generator().manual_seed(args.seed))
    for _ in range(point):  # replay SGD's run (the same data order as the training stage)
        x = data[next(batches)]
        optimizer.zero_grad(set_to_none=True)
        LOSS(model(x), x).backward()
        optimizer.step()
    products = CurvatureProducts(model, LOSS, x_curv, x_curv)
    layout = parameter_layout(model)
    kfac_hp, acp_hp = tuned("kfac"), tuned("acp")
    kfac = KFAC(model, lr=kfac_hp["lr"], damping=kfac_hp["damping"], loss="squared_error", running_average=0.0)
    torch.manual_seed(args.seed)  # K-FAC samples its targets
    kfac.update_statistics(x_curv)
    kfac_p = kfac_preconditioner(kfac, layout)
    kfac.remove_hooks()
    acp = ACP(model, lr=acp_hp["lr"], damping=acp_hp["damping"], alpha=None)
    acp.update_statistics(x_curv)
    h, g = _layer_inputs_and_gradients(model, acp.layers, x_curv)
    means = [hk.mean(dim=0) for hk in h]
    alphas = [float(gk.abs().max()) ** 2 for gk in g]  # ACP's heuristic α = max_{i,j} (∂l_i/∂a_j)², §6.4.2
    acp_p = acp_preconditioner(acp, layout, means, alphas)
    acp.remove_hooks()
    operators = {
        "gauss_newton": (products.gauss_newton_vector_product, {}),
        "kfac": (preconditioned_operator(products.gauss_newton_vector_product, kfac_p),
                 {"damping": kfac_hp["damping"], "factors": "A, G from one statistics pass on the curvature batch "
                  "(targets sampled from the model, seed given), no running average"}),
        "acp": (preconditioned_operator(products.gauss_newton_vector_product, acp_p),
                {"damping": acp_hp["damping"], "alphas": alphas,
                 "factors": "C and the input means from the curvature batch; α per layer by the heuristic on it"}),
    }
    return products, layout, operators


def run_preconditioned(log: Log, args, data) -> None:
    point = args.preconditioned_point
    if all(f"preconditioned/{point}/{n}" in log.done for n in ("gauss_newton", "kfac", "acp")):
        return
    products, layout, operators = _preconditioned_operators(args, data)
    for name, (matvec, extra) in operators.items():
        key = f"preconditioned/{point}/{name}"
        if key in log.done:
            continue
        cpu = time.process_time()
        result = lanczos(matvec, layout.size, k=args.k_preconditioned, max_iterations=args.iterations_preconditioned,
                         tol=args.tol, seed=args.seed, operator_dtype=products.theta.dtype)
        log.write({"key": key, "kind": "preconditioned", "operator": name, "sgd_update": point,
                   "curvature_batch_loss": float(products.risk()), **result.as_dict(), **extra,
                   "cpu_s": time.process_time() - cpu})


def run_trace(log: Log, args, data) -> None:
    """Hutchinson estimates of the traces of the three operators of (c): the mean eigenvalue, to set the top against."""
    point = args.preconditioned_point
    if all(f"trace/{point}/{n}" in log.done for n in ("gauss_newton", "kfac", "acp")):
        return
    products, layout, operators = _preconditioned_operators(args, data)
    for name, (matvec, _) in operators.items():
        key = f"trace/{point}/{name}"
        if key in log.done:
            continue
        cpu = time.process_time()
        samples = hutchinson_trace(matvec, layout.size, n_probes=args.trace_probes, seed=args.seed,
                                   operator_dtype=products.theta.dtype)
        log.write({"key": key, "kind": "trace", "operator": name, "sgd_update": point, "dimension": layout.size,
                   "samples": samples.tolist(), "cpu_s": time.process_time() - cpu})


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    log = Log(Path(args.out) / "spectrum.jsonl")
    mnist = load_mnist()
    data = mnist.train_images.reshape(len(mnist.train_images), -1)
    log.write({"kind": "header", "argv": sys.argv[1:], "args": vars(args), "torch": torch.__version__,
               "python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
               "cpu_count": os.cpu_count(), "mnist_source": mnist.source, "n_train": len(data),
               "curvature_batch": f"training images 0..{args.curvature_images - 1}",
               "loss": "squared error summed over the 784 pixels, mean over images"})
    stages = args.stages.split(",")
    runners = {"training": run_training, "eos": run_eos, "preconditioned": run_preconditioned, "trace": run_trace,
               "blocks": run_blocks}
    unknown = set(stages) - set(runners)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose among {sorted(runners)}")
    for stage in stages:  # in the order given
        runners[stage](log, args, data)
    log.write({"kind": "end", "stages": stages, "cpu_s_total": time.process_time()})


if __name__ == "__main__":
    main()

"""Does the benchmark's steady-state step stay on the device? A check to run where a GPU is present.

``python -m fso_lib.bench.device_check [--compile] [--updates N] [--methods sgd adam acp kfac]``

For each method it starts a run of the small autoencoder, takes a few warm-up updates (the first
statistics minibatch and inversion of ACP / K-FAC, compilation, CUDA-graph recording), then runs
:meth:`~fso_lib.bench.runner.Run.steady_state_loop` for ``N`` updates while watching for host reads:

* on a GPU, with ``torch.cuda.set_sync_debug_mode("error")``: any synchronizing CUDA call raises;
* on a CPU, with :class:`CountHostSyncs`, which counts the operators that would wait for a device.

The statistics and inversion periods of ACP and K-FAC are set longer than the check, so that only their
steady-state updates are watched (a refresh reads a factorization's status on the host by design).
It prints one line per method: host reads seen, and the time per update of the watched loop (on a CPU
that time includes the counting itself).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .runner import Run, RunConfig

#: Operators that make the host wait for the device: a scalar read (``item``/``bool``/``float``/``int``
#: of a tensor) or an output whose shape depends on the data.
HOST_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                 torch.ops.aten.masked_select.default, torch.ops.aten.equal.default,
                 torch.ops.aten.is_nonzero.default, torch.ops.aten._unique2.default}

#: Hyperparameters that keep the refresh steps of the chapter-6 methods out of the watched updates.
LONG_PERIODS = {"acp": {"amortization_period": 10**6}, "acp_fixed_alpha": {"amortization_period": 10**6},
                "kfac": {"statistics_period": 10**6, "inverse_period": 10**6},
                "natural_nn": {"amortization_period": 10**6}, "natural_nn_implicit": {"amortization_period": 10**6},
                "kfac_thesis": {"statistics_period": 10**6, "inverse_period": 10**6},
                "acp_quadratic_model": {"amortization_period": 10**6},
                "natural_nn_quadratic_model": {"amortization_period": 10**6},
                "ekfac": {"statistics_period": 10**6, "eigenbasis_period": 10**6, "scale_period": 10**6},
                "shampoo": {"root_period": 10**6}, "soap": {"eigenbasis_period": 10**6}}


class CountHostSyncs(TorchDispatchMode):
    """Records the operators of :data:`HOST_SYNC_OPS` dispatched while active (forward, backward, step).

    ``host_tensors``: tensors that live on the host whatever the device, whose reads never wait for a GPU
    (torch.optim keeps Adam's step count on the CPU unless ``capturable=True``); they are not counted."""

    def __init__(self, host_tensors=()):
        super().__init__()
        self.ops: list[str] = []
        self.host = {t.data_ptr() for t in host_tensors}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNC_OPS and not (args and isinstance(args[0], torch.Tensor) and args[0].data_ptr() in self.host):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def host_step_counters(optimizer) -> list[torch.Tensor]:
    """The step counters torch.optim keeps on the host (Adam's, unless capturable)."""
    if not isinstance(optimizer, torch.optim.Adam) or optimizer.defaults.get("capturable"):
        return []
    return [state["step"] for state in optimizer.state.values() if torch.is_tensor(state.get("step"))]


def check(method: str, device: str | None = None, updates: int = 30, warmup: int = 3, compile: bool = False,
          out_dir: str | None = None) -> dict:
    """Host reads during ``updates`` steady-state updates of ``method`` (after ``warmup`` updates)."""
    config = RunConfig(task="small_autoencoder", method=method, hyperparameters=dict(LONG_PERIODS.get(method, {})),
                       sample=True, batch_size=100, max_updates=warmup + updates, eval_every=10**6,
                       eval_schedule="linear", train_eval_size=300, progress=False, device=device,
                       compile=compile, name=f"device-check-{method}{'-compiled' if compile else ''}")
    state = Run(config, out_dir or tempfile.mkdtemp(prefix="device-check-"))
    state.start()
    state.train_steps(warmup)
    cuda = state.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(state.device)
    reads, error = [], None
    started = time.perf_counter()
    try:
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
            state.steady_state_loop(warmup + updates, started)
        else:
            with CountHostSyncs(host_step_counters(state.optimizer)) as counter:
                state.steady_state_loop(warmup + updates, started)
            reads = counter.ops
    except RuntimeError as exc:  # a synchronizing CUDA call under set_sync_debug_mode("error")
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize(state.device)
    seconds = time.perf_counter() - started
    done = state.update - warmup
    state.finish()
    return {"method": method, "device": str(state.device), "compile": compile, "updates": done,
            "host_reads": len(reads) + (error is not None), "first": reads[0] if reads else error,
            "ms_per_update": seconds / max(done, 1) * 1e3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["sgd", "adam", "acp", "kfac"])
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--device", default=None, help="default: fso_lib.config.get_device()")
    parser.add_argument("--compile", action="store_true", help="also check the compiled step")
    args = parser.parse_args(argv)
    failed = False
    for compile in ([False, True] if args.compile else [False]):
        for method in args.methods:
            result = check(method, args.device, args.updates, compile=compile)
            failed |= result["host_reads"] > 0
            print(f"{method:12s} {result['device']:8s} compile={str(compile):5s} {result['updates']} updates: "
                  f"{result['host_reads']} host reads"
                  + (f" (first: {result['first']})" if result["first"] else "")
                  + f", {result['ms_per_update']:.2f} ms/update", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark of the book (thesis chapter 4 and §6.6): tasks, methods, runs, reports.

Command line: ``python -m fso_lib.bench --help``. In Python::

    from fso_lib.bench import RunConfig, run
    result = run(RunConfig(task="autoencoder", method="adam", hyperparameters={"lr": 1e-3}, max_seconds=60),
                 out_dir="data/results/cpu")

The equal-budget race (issue 12): ``python -m fso_lib.bench race --plan``, then ``scripts/run_race.sh``.
"""
from .methods import METHODS, RACE_METHODS, Method, get_method, method_available, register_method
from .race import RaceConfig, final_summary, run_race
from .runner import RunConfig, RunResult, evaluate, read_records, run, run_paths
from .tasks import TASKS, CIFAR10Unavailable, Task, load_cifar10, make_task

__all__ = [
    "METHODS", "RACE_METHODS", "RaceConfig", "run_race", "final_summary", "Method", "get_method", "method_available", "register_method",
    "RunConfig", "RunResult", "evaluate", "read_records", "run", "run_paths",
    "TASKS", "CIFAR10Unavailable", "Task", "load_cifar10", "make_task",
]

"""Write ``data/results/speed/README.md`` from the JSON files of the speed benchmarks (issue 11).

Every number and every comparison in the README is read from ``optimizer_speed.json`` (the full table),
``optimizer_speed_goal_methods.json`` (the goal methods alone), ``optimizer_speed_compiled.json`` (compiled steps) and ``gemm_rates.json`` (the multiply-add rate of
each product, ``benchmarks/gemm_rates.py``), so that a rerun of the benchmarks and of this script rewrites the
text with it. Sections whose file is missing are left out.

    python benchmarks/speed_readme.py [--folder data/results/speed]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fso_lib.costs import amortized_update_multiply_adds

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("forward", "backward", "precondition", "statistics", "inversion")
#: issue 11's goals: amortized cost of one update over SGD's (2 threads, batch 200, same process, interleaved)
GOALS = {"acp": ("ACP", 1.5), "kfac": ("K-FAC", 1.95), "natural_nn_implicit": ("natural NN (implicit form)", 1.5)}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def command(run: dict, out: str) -> str:
    names = ",".join(run["results"])
    policy = run.get("omp_wait_policy")
    prefix = f"OMP_WAIT_POLICY={policy}" if policy else "env -u OMP_WAIT_POLICY"
    return (f"{prefix} python benchmarks/optimizer_speed.py "
            f"--threads {run['threads']} --rounds {run['rounds']} \\\n    --only {names} \\\n    --out {out}")


def conditions(run: dict) -> str:
    machine, load = run["machine"], run["load_average_1min"]
    return (f"**Machine**: {machine['logical_cpus']} logical CPUs (\"{machine['cpu']}\"), {machine['platform']}, Python "
            f"{machine['python']}, torch {machine['torch']}, code {run.get('code', 'not recorded')}, {run['threads']} "
            "threads, denormals flushed to zero, run "
            f"{run['date']}; 1-minute load average {load['before']:.2f} at the start, {load['after']:.2f} at the end. "
            f"{run['rounds']} windows of {run['window']} updates, the optimizers interleaved update by update.")


def table(run: dict) -> str:
    lines = ["| optimizer | amortized ms | × SGD | " + " | ".join(PHASES) + " | × SGD per round |",
             "|---|---:|---:|" + "---:|" * len(PHASES) + "---|"]
    for name, r in run["results"].items():
        lines.append(f"| `{name}` | {r['amortized_ms']:.1f} | **{r['ratio_to_sgd_amortized']:.2f}** | "
                     + " | ".join(f"{r['breakdown_ms'][p]:.2f}" for p in PHASES) + " | "
                     + ", ".join(f"{x:.2f}" for x in r["ratio_to_sgd_per_round"]) + " |")
    return "\n".join(lines)


def goals_section(full: dict | None, alone: dict | None, default_policy: dict | None = None) -> str:
    runs = [(label, run) for label, run in (("full table", full), ("goal methods alone", alone),
                                            ("goal methods alone, OpenMP's default wait policy", default_policy)) if run]
    lines = ["## Goals of issue 11", "",
             "Goals: " + ", ".join(f"{label} ≤ {goal}×" for label, goal in GOALS.values())
             + " an SGD update (statistics every 10 and inverses every 100 for K-FAC).", "",
             "| method | " + " | ".join(label for label, _ in runs) + " | goal |",
             "|---|" + "---:|" * (len(runs) + 1)]
    verdicts = {}
    for method, (label, goal) in GOALS.items():
        cells = []
        for run_label, run in runs:
            ratio = run["results"].get(method, {}).get("ratio_to_sgd_amortized")
            cells.append("·" if ratio is None else f"{ratio:.2f}")
            if ratio is not None:
                verdicts.setdefault(method, []).append((run_label, ratio, ratio <= goal))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {goal} |")
    lines.append("")
    for method, rows in verdicts.items():
        label, goal = GOALS[method]
        met = [r for r in rows if r[2]]
        missed = [r for r in rows if not r[2]]
        if not missed:
            lines.append(f"- {label}: goal met in {' and '.join(r[0] for r in rows)}.")
        elif not met:
            lines.append(f"- {label}: goal missed in {' and '.join(r[0] for r in rows)} (by "
                         + ", ".join(_excess(r[1], goal) for r in missed) + ").")
        else:
            lines.append(f"- {label}: goal met in {', '.join(r[0] for r in met)}, missed in "
                         + ", ".join(f"{r[0]} (by {_excess(r[1], goal)})" for r in missed) + ".")
    counts = amortized_update_multiply_adds(alone["batch"] if alone else 200, 200)
    lines += ["", "By count of multiply-adds (`fso_lib.costs.amortized_update_multiply_adds`: the passes, the step's products, the "
                  "statistics passes and inversions amortized; elementwise work not counted), one update costs "
                  + ", ".join(f"{GOALS[m][0]} {counts[c] / counts['SGD']:.2f}×" for m, c in (("acp", "ACP"), ("kfac", "K-FAC")))
                  + f" an SGD update ({counts['SGD'] / 1e9:.2f} G multiply-adds). "
                  + " ".join(f"{GOALS[m][0]}'s goal of {GOALS[m][1]}× is "
                             + ("above" if GOALS[m][1] >= counts[c] / counts["SGD"] else "**below**")
                             + " its count" + ("" if GOALS[m][1] >= counts[c] / counts["SGD"] else
                                               ": it can be met only if its multiply-adds run faster than SGD's") + "."
                             for m, c in (("acp", "ACP"), ("kfac", "K-FAC")))]
    firmness = []
    for run_label, run in runs:
        if run is full:
            continue
        spread = []
        for method, (label, goal) in GOALS.items():
            rounds = run["results"].get(method, {}).get("ratio_to_sgd_per_round")
            if rounds:
                spread.append(f"{label} {min(rounds):.2f}–{max(rounds):.2f}"
                              + (" (the goal inside)" if min(rounds) <= goal <= max(rounds) else ""))
        firmness.append(f"{run_label}: " + "; ".join(spread))
    if firmness:
        lines += ["", "How firm these verdicts are: the ratios of the single windows of 100 updates span, in "
                      + " — in ".join(firmness) + ". A verdict whose median lies within that spread of the goal is a "
                      "tie, not a pass or a fail."]
    if full and alone:
        sgd_full, sgd_alone = (run["results"]["sgd"]["amortized_ms"] for run in (full, alone))
        lines += ["", f"SGD's own update took {sgd_full:.1f} ms in the full table ({len(full['results'])} models "
                      f"interleaved) and {sgd_alone:.1f} ms with the goal methods alone ({len(alone['results'])} "
                      "models): the ratios depend on the company a method keeps, because every update starts with "
                      "caches filled by another model, which costs the leanest step (SGD's) most. Only ratios measured "
                      "in the same run compare."]
    return "\n".join(lines)


def _excess(ratio: float, goal: float) -> str:
    """How far above the goal, with enough digits to show it (1.9503 misses 1.95 by 0.0003, not by 0.00)."""
    return f"{ratio - goal:.2f}" if ratio - goal >= 0.005 else f"{ratio - goal:.4f}"


def remainder_section(run: dict | None, gemm: dict | None) -> str:
    if run is None:
        return ""
    results, lines = run["results"], ["## Where the time of the preconditioned methods goes", ""]
    sgd = results["sgd"]["breakdown_ms"]
    passes = sgd["forward"] + sgd["backward"]
    lines.append(f"In the goal-methods run, SGD's forward and backward passes take {passes:.1f} ms. Per update:")
    for method, (label, _) in GOALS.items():
        if method in results:
            b = results[method]["breakdown_ms"]
            lines.append(f"- {label}: forward + backward {b['forward'] + b['backward']:.1f} ms (no weight gradient from "
                         f"autograd), preconditioning {b['precondition']:.1f} ms, statistics {b['statistics']:.2f} ms, "
                         f"inversions {b['inversion']:.2f} ms (amortized).")
    if gemm:
        summary = gemm["summary"]
        lines += ["", f"`gemm_rates.json` (`benchmarks/gemm_rates.py`, {gemm['threads']} threads, load average "
                      f"{gemm['load_average'][0]:.2f} → {gemm['load_average'][1]:.2f}): each product of one update timed "
                      "on its own, at the layer sizes and the product orders and inverse forms the library picks:", "",
                  "| products | G multiply-adds | ms | G multiply-adds per second |", "|---|---:|---:|---:|"]
        for group, row in summary.items():
            lines.append(f"| {group} | {row['gmac']:.3f} | {row['ms']:.2f} | {row['gmac_per_s']:.1f} |")
        base = summary["SGD passes"]["gmac_per_s"]
        lines += ["", f"- SGD's forward and backward passes take {passes:.1f} ms in the run against "
                      f"{summary['SGD passes']['ms']:.1f} ms for their products alone (×{passes / summary['SGD passes']['ms']:.2f}: "
                      "activations, the loss, autograd's bookkeeping)."]
        for group, row in summary.items():
            method = _group_method(group)
            if group != "SGD passes" and method in results:
                step = results[method]["breakdown_ms"]["precondition"]
                lines.append(f"- {group}'s products run at {row['gmac_per_s'] / base:.2f}× the rate of SGD's passes when "
                             f"timed alone and take {row['ms']:.1f} ms; its whole preconditioning step takes {step:.1f} ms "
                             f"(×{step / row['ms']:.2f}). The other {step - row['ms']:.1f} ms are either the rest of the step (the "
                             "small per-layer operations, each waking the OpenMP threads; the non-finite test and the "
                             "application of the layers whose update is formed; momentum for K-FAC; Python) or the same "
                             "products running slower in place than alone (colder operands): this benchmark does not "
                             "separate the two. In the large-batch orders the update is not formed at all: its last "
                             "product goes straight into W or the momentum buffer (`fso_lib/optim/low_rank.py`).")
    return "\n".join(lines)


def wait_policy_section(folder: Path) -> str:
    """The goal methods under the three OpenMP wait policies (``omp_wait_policy/{passive,default,active}.json``)."""
    runs = [(name, _load(folder / "omp_wait_policy" / f"{name}.json")) for name in ("passive", "default", "active")]
    runs = [(name, run) for name, run in runs if run]
    if not runs:
        return ""
    methods = list(runs[0][1]["results"])
    lines = ["## The OpenMP wait policy", "",
             "The runs above set `OMP_WAIT_POLICY=PASSIVE` (idle OpenMP threads sleep instead of spinning, so that a "
             "benchmark does not steal the cores of a job running beside it). Every parallel operation then has to wake "
             "its threads. The goal methods timed one policy after the other on the idle machine (`omp_wait_policy/`, "
             f"{runs[0][1]['rounds']} windows of {runs[0][1]['window']} updates each; `default` leaves the variable unset, "
             "as a user's shell does):", "",
             "| method | " + " | ".join(f"{name}: ms | {name}: × SGD" for name, _ in runs) + " |",
             "|---|" + "---:|---:|" * len(runs)]
    for method in methods:
        lines.append(f"| `{method}` | " + " | ".join(
            f"{run['results'][method]['amortized_ms']:.1f} | {run['results'][method]['ratio_to_sgd_amortized']:.2f}"
            for _, run in runs) + " |")
    lines.append("")
    for method, (label, goal) in GOALS.items():
        if method in methods:
            met = [name for name, run in runs if run["results"][method]["ratio_to_sgd_amortized"] <= goal]
            lines.append(f"- {label} (goal {goal}×): met under {', '.join(met) if met else 'no policy'}"
                         + (f"; missed under {', '.join(n for n, _ in runs if n not in met)}" if len(met) < len(runs) else "")
                         + ".")
    loads = ", ".join(f"{name} {run['load_average_1min']['before']:.2f} → {run['load_average_1min']['after']:.2f}"
                      for name, run in runs)
    lines += ["", f"1-minute load averages: {loads} (the race's workers were paused with SIGSTOP during these runs)."]
    return "\n".join(lines)


def compiled_section(run: dict | None) -> str:
    """The steady-state step compiled (``compile_step``) against the same optimizer eager, both sync-free."""
    if run is None:
        return ""
    results = run["results"]
    lines = ["## The compiled step: `optimizer_speed_compiled.json`", "",
             "`opt.compile_step()` (off by default; on a CPU inductor needs a C++ compiler) compiles the steady-state "
             "part of `step()`: the layer updates, the non-finite flag and the application. It runs only on steps that "
             "do not read the flag, so both rows of each pair use `check_every=None` (`*_sync_free`).", "",
             "```", command(run, "data/results/speed/optimizer_speed_compiled.json"), "```", "", conditions(run), "",
             table(run), ""]
    for method, (label, goal) in GOALS.items():
        eager, compiled = results.get(f"{method}_sync_free"), results.get(f"{method}_compiled")
        if eager and compiled:
            rounds = compiled["ratio_to_sgd_per_round"]
            verdict = ("meets the goal in every window" if max(rounds) <= goal else
                       "misses the goal in every window" if min(rounds) > goal else "has the goal inside its windows' spread")
            lines.append(f"- {label}: compiled {compiled['ratio_to_sgd_amortized']:.2f}× SGD against "
                         f"{eager['ratio_to_sgd_amortized']:.2f}× eager; single windows {min(rounds):.2f}–{max(rounds):.2f}: "
                         f"it {verdict} ({goal}×).")
    return "\n".join(lines)


def _group_method(group: str) -> str:
    return {"ACP": "acp", "K-FAC": "kfac"}.get(group, group)


def render(folder: Path) -> str:
    full = _load(folder / "optimizer_speed.json")
    alone = _load(folder / "optimizer_speed_goal_methods.json")
    gemm = _load(folder / "gemm_rates.json")
    parts = ["# Optimizer speed: cost of one update on the deep autoencoder", "",
             "Written by `benchmarks/speed_readme.py` from the JSON files of this folder: every number below is "
             "read from them. Only the **ratios** measured in one run compare; absolute milliseconds of different "
             "runs and days do not.", ""]
    for title, run, out in (("The full table: `optimizer_speed.json`", full, "data/results/speed/optimizer_speed.json"),
                            ("The goal methods alone: `optimizer_speed_goal_methods.json`", alone,
                             "data/results/speed/optimizer_speed_goal_methods.json")):
        if run:
            parts += [f"## {title}", "", "```", command(run, out), "```", "", conditions(run), "", table(run), ""]
    parts += ["Breakdown, ms per update: forward (model and loss), backward (`loss.backward()`), precondition "
              "(`opt.step()` on updates that refresh nothing), statistics (`update_statistics`, amortized), inversion "
              "(extra time of the steps that refresh an inverse, a root or an eigenbasis, amortized). Row names: "
              "`*_autograd_grads`: `weight_grads=True` (autograd forms every weight gradient); `*_sync_free`: "
              "`check_every=None`; `*_compiled`: `check_every=None` and `compile_step()`; `acp_dense_inverse`: `inverse_form=\"dense\"`; `kfac_thesis_protocol`: statistics and "
              "inverses every 100 updates without running average; `*_quadratic_model`: Martens & Grosse's "
              "quadratic-model step; `shampoo`, `soap`: roots / eigenbases every 10 updates (the registry's default), "
              "`*_period_100`: every 100 (the race's setting).", ""]
    default_policy = _load(folder / "omp_wait_policy" / "default.json")
    parts += [goals_section(full, alone, default_policy), "", compiled_section(_load(folder / "optimizer_speed_compiled.json")), "",
              remainder_section(alone, gemm), "", wait_policy_section(folder), ""]
    return "\n".join(parts).rstrip() + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default=str(ROOT / "data" / "results" / "speed"))
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    (folder / "README.md").write_text(render(folder))
    print(f"wrote {folder / 'README.md'}")


if __name__ == "__main__":
    main()

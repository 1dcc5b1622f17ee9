"""EB Train against its baselines on the quickstart: accuracy, training cost, wall time.

    PYTHONPATH=. python benchmarks/quickstart_methods.py [--methods lt snip ns ...] [--seeds 0]

Runs each method on configs/quickstart.py (p = 0.5) in its own process, one after the
other (by default the paper's eight Table 2 rows: LT, SNIP, NS, ThiNet, EB Train re-init,
EB Train FF, LF, LL), then prints the runs' reports side by side (python -m eb_jax.report)
and the goals: EB Train within 1 point of 'ns' and 'dense' in test accuracy, at <= 0.5x the wall
time of 'ns'; its low-precision forms (the paper's LF: 8-bit block floating point
search; LL: 8-bit search and retraining) within 2 points of EB Train with the ticket
still detected. Wall time is the training time the report counts (compilation included,
interpreter start-up not); it is also given without the steps' compilation, which every
method pays once per network. With several seeds the means are compared.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eb_jax import report  # noqa: E402
from eb_jax.platform import configure_process  # noqa: E402

# name: config overrides. The default list is the paper's Table 2 rows, in its order.
VARIANTS = {
    "lt": ["--config.method=lt", "--config.lt_granularity=weights"],
    "snip": ["--config.method=snip"],
    "ns": ["--config.method=ns"],
    "thinet": ["--config.method=thinet"],
    "eb-reinit": [
        "--config.method=eb",
        "--config.retrain=reinit",
        "--config.retrain_schedule=fresh",
    ],
    "eb": ["--config.method=eb"],
    "lf": ["--config.method=eb", "--config.precision.search=bfp8"],
    "ll": [
        "--config.method=eb",
        "--config.precision.search=bfp8",
        "--config.precision.retrain=bfp8",
    ],
    "dense": ["--config.method=dense"],
    "lt-channels": ["--config.method=lt", "--config.lt_granularity=channels"],
    "sfp": ["--config.method=sfp"],
}
TABLE2 = ["lt", "snip", "ns", "thinet", "eb-reinit", "eb", "lf", "ll"]


def run_method(method: str, seed: int, root: str) -> dict:
    workdir = os.path.join(root, f"{method}-seed{seed}")
    cmd = [
        sys.executable,
        "-m",
        "eb_jax.main",
        "--config",
        "configs/quickstart.py",
        "--workdir",
        workdir,
        *VARIANTS[method],
        f"--config.seed={seed}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{method} failed:\n{result.stderr[-3000:]}")
    return report.read_reports([workdir])[0]


def main() -> None:
    configure_process()  # eb_jax's CPU settings, before JAX starts
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=TABLE2, choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--root", default=os.path.join(ROOT, "runs", "quickstart_methods"))
    args = parser.parse_args()
    if os.path.exists(args.root) and os.listdir(args.root):
        sys.exit(f"{args.root} is not empty: remove it or pass --root (runs would resume)")
    records = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            records[method].append(run_method(method, seed, args.root))
    print(report.format_table([r for rs in records.values() for r in rs]))
    report.plot_costs([rs[0] for rs in records.values()], os.path.join(args.root, "cost.png"))

    def mean(method, key):
        return sum(r[key] for r in records[method]) / len(records[method])

    if "eb" not in records:
        return
    acc, wall = mean("eb", "test_accuracy"), mean("eb", "wall_time_s")
    print(f"\nmeans over seeds {args.seeds}:")
    for method in records:
        print(
            f"  {method:6s} test {100 * mean(method, 'test_accuracy'):.2f}%  "
            f"wall {mean(method, 'wall_time_s'):.1f} s  "
            f"(compiling {mean(method, 'compile_time_s'):.1f} s)  "
            f"{mean(method, 'training_pflops') * 1e3:.3f} TFLOPs"
        )
    for method in ("ns", "dense"):
        if method in records:
            gap = 100 * (acc - mean(method, "test_accuracy"))
            print(f"eb - {method} test accuracy: {gap:+.2f} points (goal: within 1)")
    for method in ("lf", "ll"):
        if method in records:
            gap = 100 * (mean(method, "test_accuracy") - acc)
            detected = [
                r["ticket_epoch"] for r in records[method] if r["ticket_drawn_by"] == "detector"
            ]
            print(
                f"{method} - eb test accuracy: {gap:+.2f} points (goal: within 2); ticket "
                f"detected in {len(detected)}/{len(records[method])} runs, after epochs "
                f"{detected} (eb: {[r['ticket_epoch'] for r in records['eb']]})"
            )
    if "ns" in records:
        ratio = wall / mean("ns", "wall_time_s")
        print(f"eb / ns wall time: {ratio:.2f} (goal: <= 0.5)")
        compiled = mean("eb", "compile_time_s"), mean("ns", "compile_time_s")
        ratio = (wall - compiled[0]) / (mean("ns", "wall_time_s") - compiled[1])
        print(
            f"eb / ns wall time without compiling the steps ({compiled[0]:.1f} s and "
            f"{compiled[1]:.1f} s): {ratio:.2f}"
        )


if __name__ == "__main__":
    main()

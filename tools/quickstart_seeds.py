"""Runs the quickstart once per seed and reports its accuracies as mean and spread.

    python tools/quickstart_seeds.py [--seeds=5] [--work_dir=runs/quickstart_seeds]

Each seed is the README's quickstart command with `--seed=S` and its own `--model_dir`, so the
source task, the data split, the recipe's fine-tune and the from-scratch baseline all change
with the seed. The validation split the numbers come from is never used to choose anything in
these runs: with 89 images it is below kft's 100-image threshold for ranking checkpoints (kft
keeps the end of the schedule), and the linear probe's C is chosen by cross-validation on the
training images. A finished seed is read back, not trained again.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_seed(seed: int, work_dir: str) -> dict:
    model_dir = os.path.join(work_dir, f"seed-{seed}")
    metrics_path = os.path.join(model_dir, "metrics.json")
    if not os.path.exists(metrics_path) or "scratch_best_val_accuracy" not in _read(metrics_path):
        command = [
            sys.executable,
            "-m",
            "kft.train",
            "--flagfile=configs/quickstart.cfg",
            f"--seed={seed}",
            f"--model_dir={model_dir}",
            "--export_dir=none",
            "--verbose=0",
        ]
        print(f"seed {seed}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
    metrics = _read(metrics_path)
    return {
        "seed": seed,
        "fine_tuned": metrics["best_val_accuracy"],
        "probe": metrics.get("probe_val_accuracy"),
        "scratch": metrics["scratch_best_val_accuracy"],
        "train_seconds": metrics["train_seconds"],
    }


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _summary(values: list[float]) -> str:
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "quickstart_seeds"))
    args = parser.parse_args()
    rows = [run_seed(seed, args.work_dir) for seed in range(args.seeds)]
    print(f"{'seed':>4} {'fine-tuned':>10} {'probe':>7} {'scratch':>8} {'seconds':>8}")
    for row in rows:
        print(
            f"{row['seed']:>4} {row['fine_tuned']:>10.4f} {row['probe'] or float('nan'):>7.4f} "
            f"{row['scratch']:>8.4f} {row['train_seconds']:>8.1f}"
        )
    summary = {name: _summary([r[name] for r in rows]) for name in ("fine_tuned", "probe", "scratch")}
    print("mean ± std over seeds (population std): " + ", ".join(f"{name} {value}" for name, value in summary.items()))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    result = {
        "rows": rows,
        "summary": summary,
        "commit": commit,
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    with open(os.path.join(args.work_dir, "quickstart_seeds.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

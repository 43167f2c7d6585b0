"""Single-update against per-group updates on the demo: two short 2-rank CPU runs, their loss curves
side by side (docs/figures/update_modes_demo.png), and a table of the numbers.

    python -m msgfm.bench.update_modes --sample data/sample --steps 60

Each run is ``make demo``'s training (demo_cpu, ds_configs/cpu.json, 2 ranks, ZeRO-2, experts split
over the ranks) with ``train.mode`` set; everything else, seeds included, is the same. The curves are
the training loss of each group (interval means over ``train.log_interval`` steps) and the held-out
loss at every epoch end.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("single_update", "per_group")
GROUPS = ("rgb", "sen12ms", "mdas")
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(mode: str, sample: Path, out: Path, steps: int) -> list[dict[str, float]]:
    """One 2-rank demo run in ``mode``; its metrics.jsonl rows."""
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()), "launchers/pretrain.py",
           "--deepspeed_config", "ds_configs/cpu.json", "--config", "demo_cpu", "--data-root", str(sample),
           "--output-dir", str(out), f"train.mode={mode}", f"train.max_steps={steps}"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def curves(rows: list[dict[str, float]], prefix: str) -> dict[str, list[tuple[int, float]]]:
    """Each group's [(step, loss)] of ``prefix`` ("train" or "val")."""
    return {g: [(int(r["step"]), float(r[f"{prefix}/{g}/loss"])) for r in rows if f"{prefix}/{g}/loss" in r]
            for g in GROUPS}


def draw(results: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    colors = dict(zip(GROUPS, ("tab:blue", "tab:orange", "tab:green")))
    for ax, prefix, title in ((axes[0], "train", "training loss (interval means)"),
                              (axes[1], "val", "held-out loss (epoch ends)")):
        for mode, rows in results.items():
            style = "-" if mode == "single_update" else "--"
            for group, points in curves(rows, prefix).items():
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, style, color=colors[group], marker="o" if prefix == "val" else None,
                            markersize=3, label=f"{group}, {mode}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("L1 on masked pixels + 0.01 x MoE aux")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("demo_cpu, 2 CPU ranks, ZeRO-2: train.mode single_update (solid) vs per_group (dashed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(results: dict[str, list[dict[str, float]]]) -> list[str]:
    """Final held-out loss per group and mode, and the mean of the last training interval."""
    lines = [f"{'group':<10}" + "".join(f"{m + ' val':>22}{m + ' train':>22}" for m in results)]
    for group in GROUPS:
        cells = []
        for rows in results.values():
            val, train = curves(rows, "val")[group], curves(rows, "train")[group]
            last_val = val[-1][1] if val else float("nan")
            last_train = train[-1][1] if train else float("nan")
            cells.append(f"{last_val:>22.4f}{last_train:>22.4f}")
        lines.append(f"{group:<10}" + "".join(cells))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=Path, default=REPO / "data" / "sample",
                        help="the prepared sample (msgfm prepare-sample DIR); prepared here when missing")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "figures" / "update_modes_demo.png")
    args = parser.parse_args()
    sample = args.sample.resolve()
    if not (sample / "PROVENANCE.md").is_file():
        subprocess.run([sys.executable, "-m", "msgfm.cli", "prepare-sample", str(sample)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: run_demo(mode, sample, Path(tmp) / mode, args.steps) for mode in MODES}
    draw(results, args.figure)
    print("\n".join(summary(results)))
    print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Losses recorded from a known commit, so a refactor can prove it changed no number.

Two runs through the real deepspeed launcher (2 CPU ranks, gloo, ZeRO-2, experts split over
the ranks): the tiny synthetic run of tests/test_train_distributed.py (12 steps, every step
logged) and the demo (``make demo``: demo_cpu on the prepared sample, 60 steps, logged every
5 steps as interval means). Each logged row keeps the summed loss and every group's loss.

    python tests/reference_losses.py record            # rewrite tests/fixtures/reference_losses.json
    python tests/reference_losses.py check demo        # run the demo here and compare

A change that is *meant* to change the losses (the fidelity issue) re-records them in its own
commit, saying why. The floats compare exactly on the machine kind they were recorded on (same
torch, DeepSpeed and numpy, same CPU); elsewhere only the first logged step (see :func:`compare`).
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

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "fixtures" / "reference_losses.json"
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
GROUPS = ("rgb", "sen12ms", "mdas")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(ds_config: Path, config: str | Path, output_dir: Path, *extra: str) -> list[str]:
    """The 2-rank deepspeed launcher command the tests and the demo use."""
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(_free_port()), "launchers/pretrain.py",
            "--deepspeed_config", str(ds_config), "--config", str(config), "--output-dir", str(output_dir), *extra]


def launch_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


def logged_losses(output_dir: Path) -> dict[str, dict[str, float]]:
    """step -> {"train/loss": ..., "train/<group>/loss": ...} from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ["train/loss", *(f"train/{g}/loss" for g in GROUPS)]
    return {str(r["step"]): {k: r[k] for k in keys if k in r} for r in rows if "train/loss" in r}


def run_tiny(folder: Path) -> dict[str, dict[str, float]]:
    from test_train_support import write_tiny_run

    write_tiny_run(folder, samples_per_group=40)
    out = folder / "run"
    subprocess.run(launch_command(folder / "ds_tiny.json", folder / "tiny.yaml", out), cwd=REPO, env=launch_env(),
                   check=True, stdout=subprocess.DEVNULL)
    return logged_losses(out)


def run_demo(folder: Path, sample: Path) -> dict[str, dict[str, float]]:
    if not (sample / "PROVENANCE.md").is_file():
        subprocess.run([str(Path(sys.executable).with_name("msgfm")), "prepare-sample", str(sample)], check=True)
    out = folder / "demo"
    subprocess.run(launch_command(REPO / "ds_configs" / "cpu.json", "demo_cpu", out, "--data-root", str(sample)),
                   cwd=REPO, env=launch_env(), check=True, stdout=subprocess.DEVNULL)
    return logged_losses(out)


def machine() -> dict[str, str]:
    """What the floats depend on besides the code: library versions and the CPU they ran on."""
    import importlib.metadata as metadata
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return {"torch": torch.__version__.split("+")[0], "deepspeed": metadata.version("deepspeed"),
            "numpy": metadata.version("numpy"), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": cpu}


def compare(actual: dict[str, dict[str, float]], expected: dict[str, dict[str, float]],
            recorded_on: dict[str, str]) -> list[str]:
    """Differences between two loss tables.

    On the machine kind they were recorded on (same libraries, same CPU) every logged float must be equal.
    Elsewhere a CPU kernel or a library may round one operation differently, and training amplifies a
    1e-7 difference into percent-size ones within a few steps (measured: a fresh install of the same
    torch version gave equal losses for 4 steps, then drifted). So only the first logged step is compared
    there, at rel 1e-4: a changed loss or model still shows, rounding does not.
    """
    exact = machine() == recorded_on
    problems = []
    if sorted(actual, key=int) != sorted(expected, key=int):
        return [f"logged steps {sorted(actual, key=int)} != recorded {sorted(expected, key=int)}"]
    steps = sorted(expected, key=int) if exact else sorted(expected, key=int)[:1]
    for step in steps:
        for key, value in expected[step].items():
            got = actual[step].get(key)
            same = got == value if exact else got is not None and abs(got - value) <= 1e-4 * abs(value)
            if not same:
                problems.append(f"step {step} {key}: {got!r} != recorded {value!r}"
                                + ("" if exact else " (other machine kind: first step, rel 1e-4)"))
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["record", "check"])
    parser.add_argument("runs", nargs="*", help="tiny, demo (default: both)")
    parser.add_argument("--sample", type=Path, default=REPO / "data" / "sample")
    args = parser.parse_args()
    unknown = set(args.runs) - {"tiny", "demo"}
    if unknown:
        parser.error(f"unknown run(s) {sorted(unknown)}: choose tiny, demo")
    sys.path.insert(0, str(REPO / "tests"))
    reference = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name in args.runs or ["tiny", "demo"]:
            folder = Path(tmp) / name
            folder.mkdir()
            results[name] = run_tiny(folder) if name == "tiny" else run_demo(folder, args.sample.resolve())
    if args.action == "record":
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        reference.update({"recorded_at_commit": commit, "machine": machine(), **results})
        REFERENCE.write_text(json.dumps(reference, indent=1) + "\n")
        print(f"recorded {', '.join(results)} in {REFERENCE}")
        return 0
    failed = False
    for name, actual in results.items():
        problems = compare(actual, reference[name], reference["machine"])
        print(f"{name}: {'identical' if not problems else 'DIFFERENT'} ({len(actual)} logged steps)")
        for line in problems[:20]:
            print(f"  {line}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The one-call GPU validation run for a lent GPU machine (docs/gpu.md), and its CPU smoke.

    bash tools/gpu_check.sh                  # on the GPU machine: wheels, then this module (mode full)
    python -m msgfm.bench.gpu_check --mode smoke --out runs/gpu_check_smoke     # CPU: the plumbing

Parts, in order, each timed against a budget (the whole run: 8 minutes on an H100/H200):

1. environment: versions, the GPU, where DeepSpeed was imported from, the carried wheels;
2. synthetic shards in the real layout for the config (msgfm.data.synthetic);
3. build: msgfm's fused kernels and DeepSpeed's FusedAdam, for the local architecture only,
   side by side;
4. tests/test_kernels_cuda.py;  5. msgfm doctor (on the synthetic data);
6. launchers/profile_kernels.py at the Swin-B/192 stage shapes, batch 128, bf16;
7. msgfm.bench.train on one GPU (expert parallel 1, all 8 experts local): bf16
   (a100x8_bf16.json) and fp16 with dynamic loss scaling (v100x8.json), each with fused
   kernels and with sdpa + torch window process;
8. the same profile in fp16, if time is left.

Each part runs in its own process (a crash or hang ends that part only; the rest still runs);
their output goes to gpu_check.log. After every part gpu_check.md and gpu_check.json are
rewritten under ``--out`` (default $OUT, else runs/gpu_check), so a run cut short still
leaves its report. The smoke mode runs the same parts on a tiny config on the CPU: fp32, eager
attention standing in for the fused kernels, CUDA-only parts skipped.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from msgfm.bench import gpu_report
from msgfm.train.runtime import own_job_environment

REPO = Path(__file__).resolve().parents[2]
# --only names -> the parts (budget keys) they select; environment and data always run.
SELECTABLE = {"build": ("build",), "tests": ("kernel tests",), "doctor": ("doctor",),
              "profile": ("profile bf16", "profile fp16"), "train": ("train",)}
MAX_COPIED_BYTES = 16 * 2**20  # what the device tool brings back per file
SMOKE_CONFIG = {  # demo_cpu at 32 px with 4/2/2 samples per batch: a step takes well under a second
    "_base_": "demo_cpu", "name": "gpu_check_smoke", "model": {"img_size": 32},
    "data": {"groups": [
        {"name": "rgb", "sensors": ["rgb"], "shards": ["rgb/*.h5"], "batch_size_per_gpu": 4, "lr": 3.0e-3,
         "num_workers": 0},
        {"name": "sen12ms", "sensors": ["sar", "s2"], "shards": ["sen12ms/*.h5"], "batch_size_per_gpu": 2,
         "lr": 1.5e-3, "num_workers": 0},
        {"name": "mdas", "sensors": ["dsm", "rgb"], "shards": ["mdas/*.h5"], "batch_size_per_gpu": 2, "lr": 1.0e-3,
         "num_workers": 0}], "val_fraction": 0.2, "pin_memory": False},
}


@dataclass(kw_only=True)
class TrainRun:
    """One msgfm.bench.train run: its name in the report, ds_config and config overrides."""

    name: str
    ds_config: str
    overrides: list[str]


@dataclass(kw_only=True)
class Plan:
    """What a mode runs."""

    mode: str
    config: str
    overrides: list[str]
    synthetic_samples: int
    runs: list[TrainRun]
    steps: int
    warmup: int
    budget_s: float
    budgets: dict[str, float]


def _variants(precision: str, ds_config: str, fast: str) -> list[TrainRun]:
    fused = ["kernels.attention=fused", "kernels.window_process=fused"] if fast == "fused" else \
        ["kernels.attention=eager", "kernels.window_process=torch"]
    return [TrainRun(name=f"{precision} {fast}", ds_config=ds_config, overrides=fused),
            TrainRun(name=f"{precision} sdpa", ds_config=ds_config,
                     overrides=["kernels.attention=sdpa", "kernels.window_process=torch"])]


def make_plan(mode: str, work: Path) -> Plan:
    """The paper model on one GPU (full), or a tiny config on the CPU (smoke)."""
    ds = REPO / "ds_configs"
    if mode == "full":
        return Plan(mode=mode, config="msgfm_swinb_192", overrides=["model.moe.expert_parallel_size=1"],
                    synthetic_samples=300,  # > 2 batches of 128 after the 1% validation split; loaders recycle
                    runs=_variants("bf16", str(ds / "a100x8_bf16.json"), "fused")
                    + _variants("fp16", str(ds / "v100x8.json"), "fused"),
                    steps=20, warmup=3, budget_s=480,
                    # seconds on an H100/H200 with 16 cores, 480 in all (the 8 minutes)
                    budgets={"environment": 10, "synthetic data": 25, "build": 150, "kernel tests": 40,
                             "doctor": 35, "profile bf16": 40, "train": 35, "profile fp16": 40})
    import yaml

    config = work / "gpu_check_smoke.yaml"
    config.write_text(yaml.safe_dump(SMOKE_CONFIG))
    return Plan(mode=mode, config=str(config), overrides=[], synthetic_samples=12,
                runs=_variants("fp32", str(ds / "cpu.json"), "eager"), steps=1, warmup=1, budget_s=300,
                budgets={"environment": 20, "synthetic data": 20, "build": 5, "kernel tests": 60, "doctor": 60,
                         "profile bf16": 5, "train": 60, "profile fp16": 5})


def build_kernels() -> None:
    """Load (JIT-build) msgfm's fused kernels for TORCH_CUDA_ARCH_LIST; raises if that fails."""
    from msgfm.ops import fused

    module = fused.load_extension()
    print(f"msgfm_kernels: {module.__file__}", flush=True)


def build_fused_adam() -> None:
    """Load (JIT-build) DeepSpeed's FusedAdam op, which msgfm trains with on GPUs."""
    from msgfm.ops import kernel_build

    kernel_build.export_cuda_home()  # before DeepSpeed imports torch.utils.cpp_extension
    from deepspeed.ops.op_builder import FusedAdamBuilder

    FusedAdamBuilder().load()
    print("DeepSpeed FusedAdam: loaded", flush=True)


def load_profile(folder: Path) -> dict[str, Any]:
    """profile_kernels.json of launchers/profile_kernels.py, with its rows as a markdown table."""
    from msgfm.ops.benchmark import ProfileRow, format_table

    profile: dict[str, Any] = json.loads((folder / "profile_kernels.json").read_text())
    profile["table"] = format_table([ProfileRow(**row) for row in profile["rows"]])
    return profile


@dataclass(kw_only=True)
class Part:
    """One part's outcome: ok / warn / FAIL / skip, its time against its budget, a one-line note."""

    name: str
    budget_s: float
    status: str = "skip"
    seconds: float = 0.0
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)


class GpuCheck:
    """Runs the parts of a plan, keeps the report current under ``out``."""

    def __init__(self, plan: Plan, out: Path, work: Path, deadline_s: float, wheels: Path | None,
                 only: list[str] | None = None) -> None:
        self.plan, self.out, self.work, self.wheels = plan, out, work, wheels
        self.selected = None if not only else {key for name in only for key in SELECTABLE[name]}
        self.cuda = torch.cuda.is_available() and plan.mode == "full"
        self.started = time.perf_counter()
        self.deadline = self.started + deadline_s
        self.log_path = out / "gpu_check.log"
        self.fused_adam_failed = False  # then the training runs take torch AdamW, so they still measure
        self.data_root = work / "data"
        self.report: dict[str, Any] = {"mode": plan.mode, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                       "budget_s": plan.budget_s, "total_s": 0.0, "parts": [], "train": {},
                                       "profiles": {}, "failed_parts": []}
        out.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text(f"msgfm gpu_check ({plan.mode}) {self.report['started']}\n")

    # ---------------------------------------------------------------- plumbing

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as log:
            log.write(text if text.endswith("\n") else text + "\n")

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def command(self, args: list[str], timeout: float, label: str) -> tuple[int, str]:
        """Run ``python args...`` in the repo; output to the log; (exit code or 124 on timeout, output)."""
        cmd = [sys.executable, *args]
        limit = max(1.0, min(timeout, self.remaining()))
        self.log(f"\n===== {label}: {' '.join(cmd)} (limit {limit:.0f} s)")
        env = own_job_environment(PYTHONUNBUFFERED="1")  # each part is a one-process job of its own
        with tempfile.TemporaryFile("w+") as capture:
            try:
                rc = subprocess.run(cmd, cwd=REPO, stdout=capture, stderr=subprocess.STDOUT, env=env,
                                    timeout=limit).returncode
            except subprocess.TimeoutExpired:
                rc = 124
            capture.seek(0)
            output = capture.read()
        self.log(output + f"===== {label}: exit code {rc}")
        return rc, output

    def part(self, name: str, budget_key: str, body: Callable[[Part], None], needs_cuda: bool = False) -> Part:
        """Run ``body`` as one part: skipped without CUDA (if it needs it) or time; exceptions -> FAIL."""
        part = Part(name=name, budget_s=self.plan.budgets[budget_key])
        if self.selected is not None and budget_key in self.plan.budgets and budget_key not in \
                self.selected | {"environment", "synthetic data"}:
            part.note = "skipped: not selected by --only"
        elif needs_cuda and not self.cuda:
            part.note = "skipped: no CUDA device" if not torch.cuda.is_available() else "skipped: smoke mode"
        elif self.remaining() < 15:
            part.note = "skipped: out of time (deadline reached)"
        else:
            print(f"gpu_check: {name} (budget {part.budget_s:.0f} s) ...", flush=True)
            started = time.perf_counter()
            try:
                body(part)
            except Exception as err:
                part.status, part.note = "FAIL", f"{type(err).__name__}: {err}".splitlines()[0][:300]
                self.log(f"\n===== {name} raised:\n{traceback.format_exc()}")
            part.seconds = time.perf_counter() - started
        over = " OVER BUDGET" if part.seconds > part.budget_s else ""
        print(f"gpu_check: {name}: {part.status} in {part.seconds:.1f} s (budget {part.budget_s:.0f} s){over}; "
              f"{part.note}", flush=True)
        self.report["parts"].append(asdict(part))
        self.write()
        return part

    def write(self) -> None:
        """Rewrite gpu_check.json and gpu_check.md with what is known so far."""
        r = self.report
        r["total_s"] = time.perf_counter() - self.started
        r["failed_parts"] = [p["name"] for p in r["parts"] if p["status"] == "FAIL"]
        (self.out / "gpu_check.json").write_text(json.dumps(r, indent=2, default=str))
        (self.out / "gpu_check.md").write_text(gpu_report.markdown(r))

    # ---------------------------------------------------------------- parts

    def environment(self, part: Part) -> None:
        from msgfm.ops import kernel_build

        env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "torch CUDA": torch.version.cuda, "host": platform.node()}
        if torch.cuda.is_available():
            from msgfm.doctor.system import driver_version

            kernel_build.export_cuda_home()  # every later process builds with the same toolkit
            props = torch.cuda.get_device_properties(0)
            env.update({"GPU": f"{props.name} (compute capability {props.major}.{props.minor}, "
                               f"{props.total_memory / 2**30:.0f} GiB) x {torch.cuda.device_count()}",
                        "driver": driver_version(), "torch arch list": " ".join(torch.cuda.get_arch_list()),
                        "TORCH_CUDA_ARCH_LIST": kernel_build.pin_local_arch(),
                        "CUDA_HOME": os.environ.get("CUDA_HOME")})
        else:
            env["GPU"] = "none (no CUDA device)"
        import deepspeed

        env["DeepSpeed"] = f"{deepspeed.__version__} from {Path(deepspeed.__file__).parent}"
        env["msgfm"] = str(REPO)
        if self.wheels is not None:
            env["carried wheels"] = ", ".join(sorted(p.name for p in self.wheels.glob("*.whl"))) or "none"
        self.report["environment"] = env
        part.status, part.note = "ok", f"{env['GPU']}; torch {torch.__version__}; DeepSpeed {deepspeed.__version__}"

    def synthetic_data(self, part: Part) -> None:
        from msgfm.config import load_config
        from msgfm.data.synthetic import write_synthetic_data

        cfg = load_config(self.plan.config, self.plan.overrides)
        write_synthetic_data(cfg, self.data_root, self.plan.synthetic_samples)
        size = sum(p.stat().st_size for p in self.data_root.rglob("*.h5")) / 2**20
        part.status, part.note = "ok", (f"{self.plan.synthetic_samples} samples per group of {cfg.name} "
                                        f"({size:.0f} MiB) in {self.data_root}")

    def build(self, part: Part) -> None:
        """Msgfm's kernels and DeepSpeed's FusedAdam compile at the same time (two nvcc jobs)."""
        env = own_job_environment(PYTHONUNBUFFERED="1")
        procs, files, seconds = {}, {}, {}
        for label, function in (("kernels", "build_kernels"), ("FusedAdam", "build_fused_adam")):
            files[label] = tempfile.TemporaryFile("w+")
            code = f"from msgfm.bench.gpu_check import {function}; {function}()"
            procs[label] = (subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=files[label],
                                             stderr=subprocess.STDOUT, env=env), time.perf_counter())
        failed = []
        for label, (proc, started) in procs.items():
            try:
                rc = proc.wait(timeout=max(1.0, min(part.budget_s * 2, self.remaining())))
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = 124
            seconds[label] = time.perf_counter() - started
            files[label].seek(0)
            self.log(f"\n===== build {label} (exit code {rc}, {seconds[label]:.0f} s)\n{files[label].read()}")
            files[label].close()
            if rc:
                failed.append(f"{label} (exit {rc})")
                self.fused_adam_failed |= label == "FusedAdam"
        part.data = {"seconds": seconds}
        timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        part.status = "FAIL" if failed else "ok"
        part.note = (f"failed: {', '.join(failed)} (see gpu_check.log); " if failed else "") + timing

    def kernel_tests(self, part: Part) -> None:
        rc, output = self.command(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_cuda.py"],
                                  part.budget_s * 2, "kernel tests")
        lines = [line for line in output.splitlines() if line.strip()]
        summary = lines[-1] if lines else "(no output)"
        failed_tests = [line for line in lines if line.startswith("FAILED") or line.startswith("ERROR")]
        self.report["kernel_tests"] = {"exit_code": rc, "summary": "\n".join(failed_tests[:40] + [summary])}
        part.status = "ok" if rc == 0 else "FAIL"
        part.note = summary.strip("= ")

    def doctor(self, part: Part) -> None:
        from msgfm.doctor.report import Check, format_table

        json_path = self.work / "doctor.json"
        ds_config = self.plan.runs[0].ds_config
        rc, output = self.command(["-m", "msgfm.doctor", "--config", self.plan.config, "--data-root",
                                   str(self.data_root), "--deepspeed_config", ds_config, "--json", str(json_path),
                                   *self.plan.overrides], part.budget_s * 2, "doctor")
        if not json_path.is_file():
            part.status, part.note = "FAIL", f"exit code {rc}, no report (see gpu_check.log): {output[-200:]!r}"
            return
        rows = json.loads(json_path.read_text())["checks"]
        table = format_table([Check(**row) for row in rows])
        self.report["doctor"] = {"exit_code": rc, "checks": rows, "table": table}
        failed = [row["name"] for row in rows if row["status"] == "FAIL"]
        part.status = "ok" if rc == 0 else "FAIL"
        part.note = f"{len(rows)} checks, failed: {', '.join(failed) or 'none'}"

    def profile(self, part: Part, dtype: str) -> None:
        folder = self.work / f"profile_{dtype}"
        args = ["launchers/profile_kernels.py", "--dtype", dtype, "--iters", "50", "--warmup", "5", "--out-dir",
                str(folder)]
        rc, _ = self.command(args + ([] if dtype == "bf16" else ["--no-trace"]), part.budget_s * 2,
                             f"profile {dtype}")
        if rc or not (folder / "profile_kernels.json").is_file():
            part.status, part.note = "FAIL", f"exit code {rc} (see gpu_check.log)"
            return
        profile = load_profile(folder)
        self.report["profiles"][dtype] = profile
        for trace in folder.glob("trace_*.json"):
            if trace.stat().st_size <= MAX_COPIED_BYTES:
                shutil.copy(trace, self.out / f"{trace.stem}_{dtype}.json")
        part.status, part.note = "ok", "; ".join(profile.get("targets", []))[:300]

    def train(self, part: Part, run: TrainRun) -> None:
        json_path = self.work / f"train_{run.name.replace(' ', '_')}.json"
        fallback = ["optimizer.implementation=torch"] if self.fused_adam_failed else []
        args = ["-m", "msgfm.bench.train", "--config", self.plan.config, "--deepspeed_config", run.ds_config,
                "--data-root", str(self.data_root), "--steps", str(self.plan.steps), "--warmup",
                str(self.plan.warmup), "--json", str(json_path), *self.plan.overrides, *run.overrides, *fallback]
        rc, output = self.command(args, part.budget_s * 2, f"train {run.name}")
        if rc or not json_path.is_file():
            tail = [line for line in output.splitlines() if line.strip()][-1:] or ["(no output)"]
            part.status, part.note = "FAIL", f"exit code {rc}: {tail[0][:250]}"
            return
        result = json.loads(json_path.read_text())
        self.report["train"][run.name] = result
        part.status = "ok" if result["finite"] else "FAIL"
        mfu = f", MFU {result['mfu_pct']:.1f}%" if result.get("mfu_pct") is not None else ""
        part.note = (f"{result['samples_per_s']:.1f} samples/s, {result['s_per_step']:.3f} s/step{mfu}, "
                     f"{len(result['overflow_steps'])} overflow(s), losses finite: {result['finite']}"
                     f"{'; torch AdamW (FusedAdam did not build)' if fallback else ''}")

    # ---------------------------------------------------------------- the run

    def run(self) -> dict[str, Any]:
        """All parts, then the comparisons; returns the report."""
        self.part("environment", "environment", self.environment)
        data = self.part("synthetic data", "synthetic data", self.synthetic_data)
        self.part("build kernels + FusedAdam", "build", self.build, needs_cuda=True)
        self.part("kernel tests", "kernel tests", self.kernel_tests)
        if data.status == "ok":
            self.part("doctor", "doctor", self.doctor)
        self.part("profile bf16", "profile bf16", lambda p: self.profile(p, "bf16"), needs_cuda=True)
        for run in self.plan.runs:
            if data.status == "ok":
                self.part(f"train {run.name}", "train", functools.partial(self.train, run=run))
        self.part("profile fp16", "profile fp16", lambda p: self.profile(p, "fp16"), needs_cuda=True)
        self.summarize()
        return self.report

    def summarize(self) -> None:
        runs = self.report["train"]
        agreements = []
        for fast in self.plan.runs[::2]:
            precision = fast.name.split()[0]
            if fast.name in runs and f"{precision} sdpa" in runs:
                agreements.append(gpu_report.loss_agreement(fast.name, runs[fast.name], f"{precision} sdpa",
                                                            runs[f"{precision} sdpa"]))
        self.report["loss_agreement"] = agreements
        if "fp16 fused" in runs:
            self.report["loss_scaling"] = gpu_report.loss_scale_summary(runs["fp16 fused"])
        self.report["targets"] = gpu_report.targets(self.report["profiles"].get("bf16"), runs)
        self.write()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("full", "smoke"), default="full",
                   help="full: the paper model on a CUDA GPU; smoke: tiny shapes on the CPU (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: $OUT, else runs/gpu_check)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="stop starting parts after this many seconds (default: budget + 60)")
    p.add_argument("--wheels", type=Path, default=None, help="folder of the carried wheels (listed in the report)")
    p.add_argument("--only", default=None, metavar="PARTS",
                   help=f"comma-separated subset to run, of {','.join(SELECTABLE)} (default: all)")
    args = p.parse_args(argv)
    if args.only is not None:
        args.only = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in args.only if name not in SELECTABLE]
        if unknown:
            p.error(f"--only: unknown part(s) {unknown}; choose from {','.join(SELECTABLE)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "full" and not torch.cuda.is_available():
        print("gpu_check: error: --mode full needs a CUDA device and none is visible; on a CPU run "
              "--mode smoke (make gpu-check GPU_CHECK_MODE=smoke)", file=sys.stderr)
        return 2
    out = args.out or Path(os.environ.get("OUT") or "runs/gpu_check")
    with tempfile.TemporaryDirectory(prefix="msgfm-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        plan = make_plan(args.mode, work)
        deadline = args.deadline_s if args.deadline_s is not None else plan.budget_s + 60
        report = GpuCheck(plan, out, work, deadline, args.wheels, args.only).run()
    print("\n" + gpu_report.closing_table(report), flush=True)
    print(f"\nreport: {out / 'gpu_check.md'}, {out / 'gpu_check.json'}, log {out / 'gpu_check.log'}", flush=True)
    return 1 if report["failed_parts"] else 0


if __name__ == "__main__":
    sys.exit(main())

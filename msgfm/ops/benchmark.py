"""Kernel profiler behind launchers/profile_kernels.py: eager vs sdpa vs fused window attention,
and torch vs fused window process, at the Swin stage shapes of a config, on one CUDA device.

Per (shape, op, implementation, pass): median of >= 50 CUDA-event timings after warm-up,
peak memory above the inputs, and achieved bandwidth = compulsory bytes / time, set
against the device's measured copy bandwidth. Compulsory bytes are what any implementation
must read and write once (qkv in, output out, ...); an implementation that moves the
attention matrix or extra copies through memory shows up as a low fraction.

Legend: B batch, H/W feature map, C channels, nW windows per image, N tokens per window,
B_ = B * nW, D head dim.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from msgfm.config import RunConfig
from msgfm.errors import UserError
from msgfm.ops.testing import make_attention_case
from msgfm.ops.window_attention import window_attention
from msgfm.ops.window_process import window_merge, window_partition

MIN_ITERS = 50


@dataclass(frozen=True)
class ProfileShape:
    """One attention / window-process call site: a [B, H, W, C] map cut into ws x ws windows."""

    name: str
    batch: int
    height: int
    width: int
    channels: int
    num_heads: int
    window_size: int
    shift_size: int

    def __post_init__(self) -> None:
        if self.height % self.window_size or self.width % self.window_size:
            raise UserError(f"shape {self.name}: window {self.window_size} must divide {self.height}x{self.width}")
        if self.channels % self.num_heads:
            raise UserError(f"shape {self.name}: {self.channels} channels not divisible by {self.num_heads} heads")
        if not 0 <= self.shift_size < self.window_size:
            raise UserError(f"shape {self.name}: shift {self.shift_size} must be in [0, {self.window_size})")

    @property
    def num_windows(self) -> int:
        return self.batch * (self.height // self.window_size) * (self.width // self.window_size)

    @property
    def tokens(self) -> int:
        return self.window_size ** 2


def swin_stage_shapes(cfg: RunConfig, batch: int) -> list[ProfileShape]:
    """Every attention call shape of the config's Swin: per stage, the plain and (if any) shifted block."""
    model = cfg.model
    shapes = []
    for stage, resolution in enumerate(model.stage_resolutions):
        window = min(model.window_size, resolution)  # a map no larger than the window is one window
        channels = model.embed_dim * 2 ** stage
        shifts = [0] + ([window // 2] if resolution > model.window_size else [])
        for shift in shifts:
            shapes.append(ProfileShape(f"stage{stage + 1}{'_shift' if shift else ''}", batch, resolution,
                                       resolution, channels, model.num_heads[stage], window, shift))
    return shapes


def parse_shape(text: str) -> ProfileShape:
    """'B,H,W,C,heads,window[,shift]' -> a ProfileShape named 'custom'."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (6, 7):
        raise UserError(f"--shape '{text}': expected B,H,W,C,heads,window[,shift] (integers), "
                        f"e.g. 128,48,48,128,4,6,3")
    batch, height, width, channels, heads, window = values[:6]
    return ProfileShape("custom", batch, height, width, channels, heads, window, values[6] if len(values) == 7 else 0)


def cuda_event_times_ms(fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Time ``fn`` ``iters`` times with CUDA events after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def measured_copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of a 1 GiB buffer: (read + write) bytes / median time, in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = cuda_event_times_ms(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


def attention_bytes(shape: ProfileShape, element_size: int, backward: bool) -> int:
    """Compulsory traffic: forward reads qkv and writes out (+ fp32 row lse); backward reads qkv,
    out, grad out, lse and writes grad qkv. The bias table and mask are negligible."""
    B_, N, C = shape.num_windows, shape.tokens, shape.channels
    lse = B_ * shape.num_heads * N * 4
    forward = B_ * N * 4 * C * element_size + lse
    return forward + (B_ * N * (3 + 1 + 1 + 3) * C * element_size + lse if backward else 0)


def window_process_bytes(shape: ProfileShape, element_size: int, backward: bool) -> int:
    """Partition then merge, each one read and one write of the map; backward the same again."""
    one_pass = 2 * 2 * shape.batch * shape.height * shape.width * shape.channels * element_size
    return one_pass * (2 if backward else 1)


@dataclass
class ProfileRow:
    shape: str
    op: str
    impl: str
    pass_: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    peak_mib: float
    gbs: float
    pct_copy_bw: float
    speedup: float | None = None  # vs eager (attention) or torch (window process), same shape and pass


def _measure(fn: Callable[[], object], nbytes: int, copy_gbs: float, warmup: int, iters: int, *,
             shape: str, op: str, impl: str, pass_: str) -> ProfileRow:
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = sorted(cuda_event_times_ms(fn, warmup, iters))
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    median = statistics.median(times)
    gbs = nbytes / (median * 1e-3) / 1e9
    return ProfileRow(median_ms=median, p10_ms=times[len(times) // 10], p90_ms=times[(9 * len(times)) // 10],
                      peak_mib=peak, gbs=gbs, pct_copy_bw=100 * gbs / copy_gbs, shape=shape, op=op, impl=impl,
                      pass_=pass_)


def attention_call(shape: ProfileShape, impl: str, dtype: torch.dtype, backward: bool) -> Callable[[], object]:
    """A closure running one forward (and backward) of window attention on fresh random inputs."""
    case = make_attention_case(batch=shape.batch, height=shape.height, width=shape.width,
                               window_size=shape.window_size, shift_size=shape.shift_size, channels=shape.channels,
                               num_heads=shape.num_heads, dtype=dtype, device="cuda")
    qkv = case.qkv_BN3C.requires_grad_(backward)
    table = case.bias_table_TH.requires_grad_(backward)
    grad_out = torch.randn(shape.num_windows, shape.tokens, shape.channels, device="cuda", dtype=dtype)

    def run() -> object:
        out = window_attention(qkv, table, case.rel_index_NN, case.mask_WNN, case.num_heads, case.scale, impl)
        return torch.autograd.grad(out, (qkv, table), grad_out) if backward else out

    return run


def window_process_call(shape: ProfileShape, impl: str, dtype: torch.dtype, backward: bool) -> Callable[[], object]:
    """A closure running partition then merge (what one Swin block does), and their backward."""
    x = torch.randn(shape.batch, shape.height, shape.width, shape.channels, device="cuda", dtype=dtype,
                    requires_grad=backward)
    grad = torch.randn_like(x)
    ws, shift = shape.window_size, shape.shift_size

    def run() -> object:
        windows = window_partition(x, ws, shift, impl)
        out = window_merge(windows, ws, shift, shape.height, shape.width, impl)
        return torch.autograd.grad(out, x, grad) if backward else out

    return run


def profile_shape(shape: ProfileShape, dtype: torch.dtype, attention_impls: list[str], process_impls: list[str],
                  copy_gbs: float, warmup: int, iters: int) -> list[ProfileRow]:
    """All rows of one shape; the first implementation of each op is the speedup baseline."""
    rows = []
    size = torch.empty((), dtype=dtype).element_size()
    for op, impls, make_call, count in (("attention", attention_impls, attention_call, attention_bytes),
                                        ("window_process", process_impls, window_process_call,
                                         window_process_bytes)):
        for backward in (False, True):
            baseline = None
            for impl in impls:
                row = _measure(make_call(shape, impl, dtype, backward), count(shape, size, backward), copy_gbs,
                               warmup, iters, shape=shape.name, op=op, impl=impl,
                               pass_="fwd+bwd" if backward else "fwd")
                baseline = baseline or row.median_ms
                row.speedup = baseline / row.median_ms
                rows.append(row)
                torch.cuda.empty_cache()
    return rows


def write_trace(shape: ProfileShape, dtype: torch.dtype, attention_impls: list[str], process_impls: list[str],
                path: Path) -> None:
    """A torch.profiler Chrome trace of a few fwd+bwd steps of every implementation at ``shape``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    calls = [(f"attention/{impl}", attention_call(shape, impl, dtype, True)) for impl in attention_impls]
    calls += [(f"window_process/{impl}", window_process_call(shape, impl, dtype, True)) for impl in process_impls]
    for _, call in calls:
        call()  # build / warm up outside the trace
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for label, call in calls:
            for _ in range(3):
                with record_function(label):
                    call()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))


# Issue 5, section 6: at the stage-1 shape, fwd+bwd, (op, impl, baseline impl, minimum speedup).
TARGETS = (("attention", "fused", "eager", 2.0), ("attention", "fused", "sdpa", 1.3),
           ("window_process", "fused", "torch", 2.0))


def target_summary(rows: list[ProfileRow], shape_name: str = "stage1") -> list[str]:
    """One line per target: the measured fwd+bwd speedup at ``shape_name`` and whether it is met."""
    median = {(r.op, r.impl): r.median_ms for r in rows if r.shape == shape_name and r.pass_ == "fwd+bwd"}
    lines = []
    for op, impl, baseline, minimum in TARGETS:
        if (op, impl) not in median or (op, baseline) not in median:
            lines.append(f"{op} {impl} vs {baseline} at {shape_name}: not measured (target >= {minimum}x)")
            continue
        speedup = median[(op, baseline)] / median[(op, impl)]
        verdict = "met" if speedup >= minimum else "NOT met"
        lines.append(f"{op} {impl} vs {baseline} at {shape_name}, fwd+bwd: {speedup:.2f}x "
                     f"(target >= {minimum}x: {verdict})")
    return lines


def format_table(rows: list[ProfileRow]) -> str:
    """A markdown table, one line per row."""
    header = ("| shape | op | impl | pass | median ms | p10 ms | p90 ms | speedup | peak MiB | GB/s | % copy BW |\n"
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = [f"| {r.shape} | {r.op} | {r.impl} | {r.pass_} | {r.median_ms:.3f} | {r.p10_ms:.3f} | {r.p90_ms:.3f} | "
             f"{r.speedup:.2f}x | {r.peak_mib:.1f} | {r.gbs:.0f} | {r.pct_copy_bw:.0f}% |" for r in rows]
    return header + "\n".join(lines) + "\n"


def write_reports(rows: list[ProfileRow], meta: dict, out_dir: Path) -> tuple[Path, Path]:
    """profile_kernels.md (metadata + table) and profile_kernels.json in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out_dir / "profile_kernels.md", out_dir / "profile_kernels.json"
    lines = [f"- {key}: {value}" for key, value in meta.items()]
    targets = target_summary(rows)
    md_path.write_text("# Kernel profile\n\n" + "\n".join(lines) + "\n\n" + format_table(rows) +
                       "\n## Targets (issue 5)\n\n" + "\n".join(f"- {line}" for line in targets) + "\n")
    json_path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows], "targets": targets},
                                    indent=2))
    return md_path, json_path


def log_to_mlflow(rows: list[ProfileRow], meta: dict, artifacts: list[Path], experiment: str) -> None:
    """One MLflow run: meta as params, every row's median and bandwidth as metrics, the files as artifacts."""
    import mlflow

    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="profile_kernels"):
        mlflow.log_params({key: str(value) for key, value in meta.items()})
        for r in rows:
            key = f"{r.shape}.{r.op}.{r.impl}.{r.pass_.replace('+', '_')}"
            mlflow.log_metrics({f"{key}.median_ms": r.median_ms, f"{key}.gbs": r.gbs, f"{key}.peak_mib": r.peak_mib})
        for path in artifacts:
            mlflow.log_artifact(str(path))


class NoCudaDeviceError(RuntimeError):
    """The profiler measures CUDA kernels and there is no CUDA device."""


def profile_kernels(shapes: list[ProfileShape], dtype: torch.dtype, out_dir: Path, *, iters: int = 100,
                    warmup: int = 10, trace_shape: ProfileShape | None = None,
                    mlflow_experiment: str | None = None) -> list[ProfileRow]:
    """Profile every shape, print progress, write markdown / JSON (and a trace), optionally log to MLflow."""
    if not torch.cuda.is_available():
        raise NoCudaDeviceError("profile_kernels times CUDA kernels, and no CUDA device is visible "
                                "(torch.cuda.is_available() is False): nothing was measured")
    if iters < MIN_ITERS:
        raise UserError(f"--iters {iters}: use at least {MIN_ITERS} timed iterations for a stable median")
    from msgfm.ops import fused

    fused_ok, fused_reason = fused.available()
    attention_impls = ["eager", "sdpa"] + (["fused"] if fused_ok else [])
    process_impls = ["torch"] + (["fused"] if fused_ok else [])
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__} "
          f"CUDA {torch.version.cuda}; fused kernels: {'yes' if fused_ok else 'NO: ' + fused_reason}", flush=True)
    copy_gbs = measured_copy_bandwidth_gbs()
    print(f"measured device copy bandwidth: {copy_gbs:.0f} GB/s", flush=True)
    meta = {"device": props.name, "capability": f"{props.major}.{props.minor}", "torch": torch.__version__,
            "cuda": torch.version.cuda, "dtype": str(dtype).replace("torch.", ""), "iters": iters,
            "warmup": warmup, "copy_bandwidth_gbs": round(copy_gbs, 1),
            "fused": "available" if fused_ok else f"unavailable: {fused_reason}"}
    rows: list[ProfileRow] = []
    for index, shape in enumerate(shapes, 1):
        print(f"[{index}/{len(shapes)}] {shape.name}: B={shape.batch} {shape.height}x{shape.width} C={shape.channels} "
              f"heads={shape.num_heads} window={shape.window_size} shift={shape.shift_size} "
              f"({shape.num_windows} windows)", flush=True)
        rows += profile_shape(shape, dtype, attention_impls, process_impls, copy_gbs, warmup, iters)
    print(format_table(rows) + "\n" + "\n".join(target_summary(rows)), flush=True)
    artifacts = list(write_reports(rows, meta, out_dir))
    if trace_shape is not None:
        trace_path = out_dir / f"trace_{trace_shape.name}.json"
        write_trace(trace_shape, dtype, attention_impls, process_impls, trace_path)
        artifacts.append(trace_path)
    print("wrote " + ", ".join(str(p) for p in artifacts), flush=True)
    if mlflow_experiment:
        log_to_mlflow(rows, meta, artifacts, mlflow_experiment)
    return rows

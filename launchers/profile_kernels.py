"""Profile the Swin window-attention and window-process implementations on one CUDA device.

For every attention call shape of a config's Swin (default msgfm_swinb_192: Swin-B/192,
window 6; stage i has (48 / 2^i)^2 tokens per image, C = 128 * 2^i, 4 * 2^i heads, and
stage 4's 6x6 map is a single unshifted window) at the config's batch per GPU (128, the
`rgb` group), plus any --shape, this times

  attention:      eager, sdpa, fused          forward, and forward + backward
  window process: torch (roll + partition + merge + roll), fused

with CUDA events after warm-up (median of >= 50 runs), and reports peak memory and the
achieved bandwidth (compulsory bytes / time) against the device's measured copy bandwidth.
It prints a table and writes profile_kernels.md, profile_kernels.json and a torch.profiler
Chrome trace (open in chrome://tracing or https://ui.perfetto.dev) into --out-dir; --mlflow
logs them to MLflow (MLFLOW_TRACKING_URI, default a local ./mlruns store).

Needs a CUDA device: on a machine without one it says so and exits with status 2.

    python launchers/profile_kernels.py --dtype fp16
    python launchers/profile_kernels.py --no-stages --shape 32,48,48,128,4,6,3 --iters 200
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="msgfm_swinb_192", help="config name or YAML path (default: %(default)s)")
    parser.add_argument("--group", default="rgb",
                        help="data group whose batch_size_per_gpu is used (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=None, help="override the batch per GPU")
    parser.add_argument("--shape", action="append", default=[], metavar="B,H,W,C,HEADS,WINDOW[,SHIFT]",
                        help="an extra shape to profile (repeatable), e.g. 128,48,48,128,4,6,3")
    parser.add_argument("--no-stages", action="store_true", help="profile only the --shape shapes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16",
                        help="activation dtype (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=100,
                        help="timed runs per measurement, >= 50 (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/profile_kernels"), help="default: %(default)s")
    parser.add_argument("--no-trace", action="store_true", help="skip the torch.profiler trace (of the first shape)")
    parser.add_argument("--mlflow", nargs="?", const="msgfm-kernels", default=None, metavar="EXPERIMENT",
                        help="log to MLflow under EXPERIMENT (default name when given bare: msgfm-kernels)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from msgfm.config import load_config
    from msgfm.ops.benchmark import NoCudaDeviceError, parse_shape, profile_kernels, swin_stage_shapes

    cfg = load_config(args.config)
    batch = args.batch if args.batch is not None else cfg.data.group(args.group).batch_size_per_gpu
    shapes = ([] if args.no_stages else swin_stage_shapes(cfg, batch)) + [parse_shape(s) for s in args.shape]
    if not shapes:
        raise SystemExit("nothing to profile: --no-stages without --shape")
    try:
        profile_kernels(shapes, getattr(torch, DTYPES[args.dtype]), args.out_dir, iters=args.iters,
                        warmup=args.warmup, trace_shape=None if args.no_trace else shapes[0],
                        mlflow_experiment=args.mlflow)
    except NoCudaDeviceError as err:
        print(f"profile_kernels: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

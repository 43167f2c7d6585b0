"""The fused window-attention kernels on this GPU: load the ahead-of-time build or JIT-build
it for this GPU's architecture only, then a quick forward + backward parity check against
the float64 reference on fresh random inputs (a few shapes, a few seconds).

Legend: B batch, H/W feature map, ws window, shift, heads, D head dim.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from msgfm.doctor.report import FAIL, OK, Check, skipped

# (B, H, W, ws, shift, heads, D): Swin-B/192's window 6 with and without shift, an odd window
# count, a one-window map, window 12; head dims 32 (Swin-B) and 16 / 64.
PARITY_SHAPES = ((2, 12, 12, 6, 3, 4, 32), (1, 18, 30, 6, 3, 2, 16), (1, 6, 6, 6, 0, 2, 64), (1, 24, 24, 12, 6, 2, 32))


def kernel_checks(progress: bool = True) -> list[Check]:
    """Two rows: the extension loads (how, how long), and it matches the reference."""
    if not torch.cuda.is_available():
        return [skipped("fused kernels: build"), skipped("fused kernels: parity")]
    from msgfm.ops import fused, kernel_build

    arch = kernel_build.pin_local_arch()
    if progress:
        print(f"doctor: loading the fused kernels (a JIT build for {arch} takes minutes the first time)...",
              flush=True)
    started = time.perf_counter()
    ok, reason = fused.available()
    seconds = time.perf_counter() - started
    if not ok:
        return [Check(name="fused kernels: build", status=FAIL, result=reason.splitlines()[0][:200],
                      todo="fix the build (CUDA_HOME, ninja, a toolkit matching torch's CUDA; docs/kernels.md) or "
                           "train with kernels.attention=sdpa kernels.window_process=torch (slower)",
                      details=reason[-4000:]),
                skipped("fused kernels: parity", "skipped: the kernels did not load")]
    where = str(getattr(fused.load_extension(), "__file__", "?"))
    build = Check(name="fused kernels: build", status=OK,
                  result=f"loaded in {seconds:.1f} s (TORCH_CUDA_ARCH_LIST={arch}) from {where}",
                  data={"file": where, "arch": arch, "seconds": round(seconds, 2)})
    return [build, parity_check()]


def _dtypes() -> list[torch.dtype]:
    from msgfm.doctor.system import bf16_native

    return [torch.float32, torch.float16] + ([torch.bfloat16] if bf16_native(torch.cuda.current_device()) else [])


def parity_check(device: str = "cuda", dtypes: Sequence[torch.dtype] | None = None) -> Check:
    """Fused attention (output, grad qkv, grad table) and window process against their references.

    ``device`` and ``dtypes`` exist for the tests, which drive this on the CPU through a torch
    model of the extension; the doctor runs it on the current GPU in every dtype it computes."""
    from msgfm.ops import fused
    from msgfm.ops.testing import (
        PARITY_TOLERANCE,
        attention_reference_float64,
        attention_with_grads,
        make_attention_case,
        relative_error,
    )
    from msgfm.ops.window_process import window_partition_torch

    worst: dict[str, float] = {}
    bad: list[str] = []
    cases = 0
    for dtype in dtypes or _dtypes():
        out_tol, grad_tol = PARITY_TOLERANCE[dtype]
        for batch, height, width, window, shift, heads, head_dim in PARITY_SHAPES:
            case = make_attention_case(batch=batch, height=height, width=width, window_size=window,
                                       shift_size=shift, channels=heads * head_dim, num_heads=heads, dtype=dtype,
                                       device=device)
            grad_out = torch.randn(case.qkv_BN3C.shape[0], window * window, heads * head_dim, device=device,
                                   dtype=dtype)
            expected = attention_reference_float64(case, grad_out)
            try:
                got = attention_with_grads(case, "fused", grad_out)
            except Exception as err:  # a launch failure is a finding, not a crash of the doctor
                bad.append(f"{dtype} {batch}x{height}x{width} ws{window}: {type(err).__name__}: {err}")
                continue
            cases += 1
            for label, actual, reference, tol in zip(("out", "grad qkv", "grad table"), got, expected,
                                                     (out_tol, grad_tol, grad_tol)):
                assert actual is not None and reference is not None  # a grad_out was given
                error = relative_error(actual, reference) if torch.isfinite(actual).all() else float("inf")
                key = f"{str(dtype).replace('torch.', '')} {label}"
                worst[key] = max(worst.get(key, 0.0), error)
                if not error <= tol:
                    bad.append(f"{key} at B={batch} {height}x{width} ws={window} shift={shift} D={head_dim}: "
                               f"relative error {error:.2e} > {tol:.0e}")
    x = torch.randn(2, 12, 18, 64, device=device, dtype=torch.float16)
    if not torch.equal(fused.window_partition(x, 6, 3), window_partition_torch(x, 6, 3)):
        bad.append("window_partition (fp16, shift 3) differs from torch.roll + partition")
    summary = ", ".join(f"{k} {v:.1e}" for k, v in worst.items() if k.endswith("out"))
    if bad:
        return Check(name="fused kernels: parity", status=FAIL, result=f"{len(bad)} mismatch(es); first: {bad[0]}",
                     todo="do not train with kernels.attention=fused; run pytest tests/test_kernels_cuda.py and "
                          "report the failures (use kernels.attention=sdpa meanwhile)",
                     details="\n".join(bad), data={"worst": worst})
    return Check(name="fused kernels: parity", status=OK,
                 result=f"{cases} cases fwd+bwd vs float64 within tolerance (worst output error: {summary}); "
                        f"window process exact", data={"worst": worst, "cases": cases})

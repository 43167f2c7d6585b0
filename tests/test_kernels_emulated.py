"""The CUDA kernel source, run on the CPU: kernels/emulation/ compiles kernels/*_kernels.cuh with the
host compiler behind a tiny CUDA shim (blocks in turn, a block's threads as std::threads,
__syncthreads as a barrier, NaN-filled shared memory, atomicAdd as std::atomic_ref).

This checks the kernels' indexing, tiling, synchronisation and arithmetic against the float64
reference with NaN-poisoned outputs, where no GPU is at hand. It cannot check what only a GPU
has (register and shared-memory limits, speed): tests/test_kernels_cuda.py does that on one.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from msgfm.ops import kernel_build
from msgfm.ops.fused import scatter_bias_grad
from msgfm.ops.testing import attention_reference_float64, make_attention_case, relative_error
from msgfm.ops.window_process import window_merge_torch, window_partition_torch

EMULATION_SOURCE = kernel_build.KERNEL_DIR / "emulation" / "emulate_kernels.cpp"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Max relative error of (output, gradients) against float64, as in tests/test_kernels_cuda.py.
TOLERANCE = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 1e-2), torch.bfloat16: (2e-2, 5e-2)}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> ctypes.CDLL:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler to build the kernel emulation")
    library = tmp_path_factory.mktemp("kernel_emulation") / "libmsgfm_emulate.so"
    command = [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
               f"-I{Path(torch.__file__).parent / 'include'}", str(EMULATION_SOURCE), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"the kernel source does not compile on the host:\n{result.stderr[-8000:]}"
    return ctypes.CDLL(str(library))


def _ptr(tensor: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if tensor is None else tensor.data_ptr())


def emulated_attention(emulator, case, grad_out_BNC):
    """Forward and backward through the emulated kernels, outputs poisoned with NaN first."""
    qkv = case.qkv_BN3C.contiguous()
    B_, N, C3 = qkv.shape
    C, heads = C3 // 3, case.num_heads
    table = case.bias_table_TH.float().contiguous()
    mask = None if case.mask_WNN is None else case.mask_WNN.float().contiguous()
    mask_windows = 1 if mask is None else mask.shape[0]
    dims = [ctypes.c_int(v) for v in (B_, N, heads, C // heads, mask_windows)] + [ctypes.c_float(case.scale)]
    code = ctypes.c_int(DTYPE_CODES[qkv.dtype])
    out = torch.full((B_, N, C), float("nan"), dtype=qkv.dtype)
    lse = torch.full((B_, heads, N), float("nan"))
    status = emulator.msgfm_emulate_attention_forward(code, _ptr(qkv), _ptr(table), _ptr(case.rel_index_NN),
                                                      _ptr(mask), _ptr(out), _ptr(lse), *dims)
    assert status == 0
    grad_out = grad_out_BNC.to(qkv.dtype).contiguous()
    grad_qkv = torch.full_like(qkv, float("nan"))
    grad_bias = torch.zeros(heads, N, N)
    status = emulator.msgfm_emulate_attention_backward(code, _ptr(grad_out), _ptr(qkv), _ptr(out), _ptr(lse),
                                                       _ptr(table), _ptr(case.rel_index_NN), _ptr(mask),
                                                       _ptr(grad_qkv), _ptr(grad_bias), *dims)
    assert status == 0
    grad_table = scatter_bias_grad(grad_bias, case.rel_index_NN, table.shape[0])
    return out, lse, grad_qkv, grad_table


# (batch, height, width, window, shift, heads, head_dim, dtype): every head dim, windows 6 and 12
# (12: three K/V tiles of 64, 64, 16 rows), shift, odd window counts, batch 1, the three dtypes.
CASES = [
    (1, 12, 18, 6, 3, 2, 16, torch.float32),  # 6 windows, shifted
    (2, 12, 12, 6, 0, 1, 32, torch.float32),
    (2, 18, 18, 6, 3, 1, 64, torch.float32),  # 18 windows: 3 backward blocks of up to 8 windows
    (1, 24, 12, 12, 6, 2, 16, torch.float32),
    (1, 12, 12, 12, 0, 1, 32, torch.float32),  # one window
    (1, 12, 18, 6, 3, 1, 32, torch.float16),
    (1, 24, 12, 12, 6, 1, 16, torch.bfloat16),
]


@pytest.mark.parametrize("batch,height,width,window,shift,heads,head_dim,dtype", CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_emulated_attention_kernels_match_float64_reference(emulator, batch, height, width, window, shift, heads,
                                                            head_dim, dtype):
    case = make_attention_case(batch=batch, height=height, width=width, window_size=window, shift_size=shift,
                               channels=heads * head_dim, num_heads=heads, dtype=dtype)
    grad_out = torch.randn(case.qkv_BN3C.shape[0], window * window, heads * head_dim).to(dtype)
    ref_out, ref_gqkv, ref_gtable = attention_reference_float64(case, grad_out)
    out, lse, grad_qkv, grad_table = emulated_attention(emulator, case, grad_out)
    for name, value in (("out", out), ("lse", lse), ("grad qkv", grad_qkv), ("grad table", grad_table)):
        assert torch.isfinite(value).all(), f"{name} has NaN: an element was not written or read garbage"
    out_tol, grad_tol = TOLERANCE[dtype]
    assert relative_error(out, ref_out) < out_tol
    assert relative_error(grad_qkv, ref_gqkv) < grad_tol
    assert relative_error(grad_table, ref_gtable) < grad_tol


@pytest.mark.parametrize("dtype,channels,unit", [(torch.float32, 4, 16), (torch.float32, 3, 4),
                                                 (torch.float16, 3, 2)])
@pytest.mark.parametrize("batch,height,width,window,shift", [(2, 12, 18, 6, 3), (1, 24, 12, 12, 6),
                                                             (1, 12, 12, 6, 0)])
def test_emulated_window_copy_matches_torch(emulator, batch, height, width, window, shift, dtype, channels, unit):
    x = torch.randn(batch, height, width, channels).to(dtype)
    row_bytes = channels * x.element_size()
    geometry = [ctypes.c_int64(x.numel() * x.element_size())] + \
        [ctypes.c_int(v) for v in (row_bytes, height, width, window, shift)]
    windows = torch.full_like(window_partition_torch(x, window, shift), float("nan"))
    assert emulator.msgfm_emulate_window_copy(1, unit, _ptr(x), _ptr(windows), *geometry) == 0
    assert torch.equal(windows, window_partition_torch(x, window, shift))
    merged = torch.full_like(x, float("nan"))
    assert emulator.msgfm_emulate_window_copy(0, unit, _ptr(windows), _ptr(merged), *geometry) == 0
    assert torch.equal(merged, window_merge_torch(windows, window, shift, height, width))
    assert torch.equal(merged, x)

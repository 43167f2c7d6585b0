"""The fused CUDA kernels (kernels/*.cu): build or load the extension, and wrap it in autograd.

The extension is the module ``msgfm_kernels``. It is taken from an ahead-of-time build
(``MSGFM_BUILD_KERNELS=1 pip install -e .``) when one imports, and otherwise compiled
on first use with ninja through :func:`torch.utils.cpp_extension.load` into torch's
extension cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``),
which later runs reuse. Architectures follow ``TORCH_CUDA_ARCH_LIST`` (default: the
visible GPUs). See docs/kernels.md.

Legend: B_ windows in the batch, N tokens per window, C channels, H heads,
T bias-table rows, nW windows per image, B/H/W/C of a feature map [B, H, W, C].
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
from types import ModuleType
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from msgfm.ops import kernel_build

log = logging.getLogger(__name__)

class KernelBuildError(RuntimeError):
    """The CUDA extension could not be built or loaded; the message says why and what to do."""


_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "module" -> ModuleType, or "error" -> KernelBuildError (tried once per process)


def build(*, build_directory: str | None = None, verbose: bool = False) -> ModuleType:
    """Compile kernels/*.cu with ninja (JIT) and import the result; raises :class:`KernelBuildError`.

    Unchanged sources are not recompiled: torch keeps the build in ``build_directory``
    (default: its extension cache) and only reruns ninja when a source or flag changed.
    """
    sources = kernel_build.kernel_sources()
    if not sources:
        raise KernelBuildError(f"no CUDA sources found in {kernel_build.KERNEL_DIR}: a non-editable install does "
                               f"not ship kernels/; use `pip install -e .` or `MSGFM_BUILD_KERNELS=1 pip install .`")
    if torch.version.cuda is None:
        raise KernelBuildError(f"this torch build ({torch.__version__}) has no CUDA support")
    if kernel_build.export_cuda_home() is None:
        raise KernelBuildError("no CUDA toolkit found: set CUDA_HOME to a folder with bin/nvcc")
    from torch.utils import cpp_extension

    kernel_build.export_cuda_home()  # keep an already imported cpp_extension on the same toolkit
    if not cpp_extension.is_ninja_available():
        raise KernelBuildError("ninja is not installed (pip install ninja); it drives the JIT build")
    if build_directory is not None:
        os.makedirs(build_directory, exist_ok=True)
    try:
        return cpp_extension.load(
            name=kernel_build.EXTENSION_NAME,
            sources=[str(path) for path in sources],
            extra_cflags=kernel_build.cxx_flags(),
            extra_cuda_cflags=kernel_build.NVCC_FLAGS,
            extra_include_paths=[str(kernel_build.KERNEL_DIR)],
            build_directory=build_directory,
            verbose=verbose,
        )
    except Exception as err:  # compiler errors arrive as RuntimeError with the ninja log
        raise KernelBuildError(f"building the msgfm CUDA extension from {kernel_build.KERNEL_DIR} failed: "
                               f"{type(err).__name__}: {err}") from err


def _ahead_of_time_build() -> ModuleType | None:
    """The module of ``MSGFM_BUILD_KERNELS=1 pip install``, unless it is missing or older than kernels/."""
    try:
        module = importlib.import_module(kernel_build.EXTENSION_NAME)
    except ImportError as err:
        log.info("msgfm kernels: no ahead-of-time build (%s); compiling with ninja (first use only)", err)
        return None
    expected = kernel_build.source_digest() if kernel_build.kernel_sources() else None
    if expected is not None and getattr(module, "source_digest", None) != expected:
        log.warning("msgfm kernels: the ahead-of-time build %s predates the sources in %s; compiling them with "
                    "ninja instead (rerun MSGFM_BUILD_KERNELS=1 pip install to refresh it)",
                    getattr(module, "__file__", "?"), kernel_build.KERNEL_DIR)
        return None
    log.info("msgfm kernels: using the ahead-of-time build %s", getattr(module, "__file__", "?"))
    return module


def load_extension() -> ModuleType:
    """The extension module: the AOT build if it imports, else the JIT build. Tried once per process."""
    with _lock:
        if "module" in _loaded:
            return _loaded["module"]  # type: ignore[return-value]
        if "error" in _loaded:
            raise _loaded["error"]  # type: ignore[misc]
        try:
            module = _ahead_of_time_build()
            if module is None:
                module = build()
        except KernelBuildError as err:
            _loaded["error"] = err
            raise
        _loaded["module"] = module
        return module


def available() -> tuple[bool, str]:
    """(True, "") when the fused kernels can run here, else (False, the reason)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (torch.cuda.is_available() is False)"
    try:
        load_extension()
    except KernelBuildError as err:
        return False, str(err)
    return True, ""


def scatter_bias_grad(grad_bias_HNN: torch.Tensor, rel_index_NN: torch.Tensor, table_rows: int) -> torch.Tensor:
    """[H, N, N] bias gradient (summed over windows) -> [T, H] table gradient, in fp32.

    Many (i, j) pairs share a table row: index_add_ sums them (a plain index assignment would keep one)."""
    H, N = grad_bias_HNN.shape[0], grad_bias_HNN.shape[1]
    grad_table_TH = torch.zeros(table_rows, H, dtype=torch.float32, device=grad_bias_HNN.device)
    pairs_NNxH = grad_bias_HNN.float().permute(1, 2, 0).reshape(N * N, H)
    return grad_table_TH.index_add_(0, rel_index_NN.reshape(-1), pairs_NNxH)


class WindowAttentionFunction(torch.autograd.Function):
    """softmax(q k^T * scale + table[rel_index] + mask) v, from qkv [B_, N, 3C] to [B_, N, C]."""

    @staticmethod
    def forward(ctx: Any, qkv_BN3C: torch.Tensor, bias_table_TH: torch.Tensor, rel_index_NN: torch.Tensor,
                mask_WNN: torch.Tensor | None, num_heads: int, scale: float) -> torch.Tensor:
        ext = load_extension()
        qkv_BN3C = qkv_BN3C.contiguous()
        # The table and the mask are tiny; the kernel reads them as fp32 whatever the activation dtype.
        table_TH = bias_table_TH.detach().float().contiguous()
        rel_index_NN = rel_index_NN.long().contiguous()
        mask_WNN = None if mask_WNN is None else mask_WNN.detach().float().contiguous()
        out_BNC, lse_BHN = ext.window_attention_forward(qkv_BN3C, table_TH, rel_index_NN, mask_WNN, num_heads,
                                                        float(scale))
        ctx.save_for_backward(qkv_BN3C, out_BNC, lse_BHN, table_TH, rel_index_NN, mask_WNN)
        ctx.num_heads, ctx.scale, ctx.table_dtype = num_heads, float(scale), bias_table_TH.dtype
        return out_BNC

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out_BNC: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qkv_BN3C, out_BNC, lse_BHN, table_TH, rel_index_NN, mask_WNN = ctx.saved_tensors
        grad_qkv_BN3C, grad_bias_HNN = load_extension().window_attention_backward(
            grad_out_BNC.contiguous(), qkv_BN3C, out_BNC, lse_BHN, table_TH, rel_index_NN, mask_WNN,
            ctx.num_heads, ctx.scale)
        grad_table_TH = None
        if ctx.needs_input_grad[1]:
            grad_table_TH = scatter_bias_grad(grad_bias_HNN, rel_index_NN, table_TH.shape[0]).to(ctx.table_dtype)
        return grad_qkv_BN3C, grad_table_TH, None, None, None, None


class WindowPartitionFunction(torch.autograd.Function):
    """[B, H, W, C] -> roll by -shift -> [B * nW, N, C] in one pass; backward is the merge."""

    @staticmethod
    def forward(ctx: Any, x_BHWC: torch.Tensor, window_size: int, shift_size: int) -> torch.Tensor:
        ctx.geometry = (window_size, shift_size, x_BHWC.shape[1], x_BHWC.shape[2])
        return load_extension().window_partition(x_BHWC.contiguous(), window_size, shift_size)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_BNC: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        window_size, shift_size, H, W = ctx.geometry
        return load_extension().window_merge(grad_BNC.contiguous(), window_size, shift_size, H, W), None, None


class WindowMergeFunction(torch.autograd.Function):
    """[B * nW, N, C] -> roll by +shift -> [B, H, W, C] in one pass; backward is the partition."""

    @staticmethod
    def forward(ctx: Any, windows_BNC: torch.Tensor, window_size: int, shift_size: int, H: int,
                W: int) -> torch.Tensor:
        ctx.geometry = (window_size, shift_size)
        return load_extension().window_merge(windows_BNC.contiguous(), window_size, shift_size, H, W)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_BHWC: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        window_size, shift_size = ctx.geometry
        return load_extension().window_partition(grad_BHWC.contiguous(), window_size, shift_size), None, None, \
            None, None


def window_attention(qkv_BN3C: torch.Tensor, bias_table_TH: torch.Tensor, rel_index_NN: torch.Tensor,
                     mask_WNN: torch.Tensor | None, num_heads: int, scale: float) -> torch.Tensor:
    """Fused window attention: qkv [B_, N, 3C] -> [B_, N, C] (see msgfm/ops/window_attention.py).

    The kernel takes head dims 16, 32, 64 and up to 256 tokens per window; other shapes raise
    a ValueError from the extension that names the limit."""
    return WindowAttentionFunction.apply(qkv_BN3C, bias_table_TH, rel_index_NN, mask_WNN, num_heads, scale)


def window_partition(x_BHWC: torch.Tensor, window_size: int, shift_size: int) -> torch.Tensor:
    """Fused roll(-shift) + partition: [B, H, W, C] -> [B * nW, N, C]."""
    return WindowPartitionFunction.apply(x_BHWC, window_size, shift_size)


def window_merge(windows_BNC: torch.Tensor, window_size: int, shift_size: int, H: int, W: int) -> torch.Tensor:
    """Fused merge + roll(+shift): [B * nW, N, C] -> [B, H, W, C]."""
    return WindowMergeFunction.apply(windows_BNC, window_size, shift_size, H, W)

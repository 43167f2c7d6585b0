"""Where the CUDA sources are and how they are compiled: shared by the JIT build
(msgfm/ops/fused.py) and the ahead-of-time build (setup.py, ``MSGFM_BUILD_KERNELS=1``).

This file imports neither torch nor msgfm at module level, so setup.py can load it
by path before torch.utils.cpp_extension is imported (which reads CUDA_HOME once,
at import time).
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
from pathlib import Path

# One module name for both builds: `import msgfm_kernels` finds the AOT build,
# torch.utils.cpp_extension.load(name=EXTENSION_NAME) gives the JIT one.
EXTENSION_NAME = "msgfm_kernels"
KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"
CXX_FLAGS = ["-O3"]
# No --use_fast_math: the fp32 path is checked against a float64 reference, and
# exp/log are not what limits these kernels.
NVCC_FLAGS = ["-O3", "-lineinfo"]


def kernel_sources(kernel_dir: Path = KERNEL_DIR) -> list[Path]:
    """The .cpp and .cu files of the extension (headers are picked up through #include)."""
    return sorted(p for p in kernel_dir.glob("*") if p.suffix in (".cpp", ".cu"))


def source_digest(kernel_dir: Path = KERNEL_DIR) -> str:
    """A short hash of every file in kernels/; compiled into the module (``source_digest``) so a
    stale ahead-of-time build is noticed after the sources change."""
    digest = hashlib.sha256()
    for path in sorted(p for p in kernel_dir.glob("*") if p.suffix in (".cpp", ".cu", ".cuh", ".h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return "d" + digest.hexdigest()[:16]  # starts with a letter: it is passed as a -D identifier


def cxx_flags() -> list[str]:
    """Host compiler flags, with the source digest the bindings expose."""
    return CXX_FLAGS + [f"-DMSGFM_SOURCE_DIGEST={source_digest()}"]


def find_cuda_home() -> str | None:
    """The CUDA toolkit to build with: $CUDA_HOME / $CUDA_PATH, else /usr/local/cuda, else the newest
    /usr/local/cuda-X.Y, else the folder above the real `nvcc` on PATH. None when there is no toolkit.

    torch guesses the folder above `nvcc` on PATH, which is wrong when `nvcc` is a wrapper script
    (e.g. /usr/local/bin/nvcc -> headers and libraries not found), hence the explicit search."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for folder in candidates:
        if (Path(folder) / "bin" / "nvcc").is_file() and (Path(folder) / "include" / "cuda_runtime.h").is_file():
            return folder
    return None


def export_cuda_home() -> str | None:
    """Set $CUDA_HOME to :func:`find_cuda_home` when it is unset, and point an already imported
    torch.utils.cpp_extension at it. Returns the toolkit folder (None without one)."""
    import sys

    home = find_cuda_home()
    if home is None:
        return None
    os.environ.setdefault("CUDA_HOME", home)
    cpp_extension = sys.modules.get("torch.utils.cpp_extension")
    if cpp_extension is not None and getattr(cpp_extension, "CUDA_HOME", None) != os.environ["CUDA_HOME"]:
        # cpp_extension resolved CUDA_HOME when it was imported; keep it consistent with the env.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # type: ignore[attr-defined]
    return os.environ["CUDA_HOME"]


def pin_local_arch() -> str | None:
    """Set TORCH_CUDA_ARCH_LIST to the visible GPUs' compute capabilities (e.g. "9.0") unless it is
    set, so a JIT build compiles for this machine's architecture only. Returns the value in force
    (None without a CUDA device). Every process of one job must agree on it: the JIT build is
    redone when its flags change."""
    import torch

    if not torch.cuda.is_available():
        return os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{major}.{minor}" for major, minor in caps)
    return os.environ["TORCH_CUDA_ARCH_LIST"]

"""Where a CUDA toolkit is present: the extension must compile (one architecture, to stay short).

Runs the JIT build in a subprocess with TORCH_CUDA_ARCH_LIST=8.0 (override with
MSGFM_TEST_CUDA_ARCH) into .cache/ of the repo, so a rerun with unchanged sources
only relinks/imports; any edit of kernels/ recompiles. Skipped only when there is no
toolkit; a compile error fails the test with the compiler output.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from msgfm.ops import kernel_build

REPO_ROOT = Path(__file__).resolve().parents[1]

BUILD_SCRIPT = """
import sys
from msgfm.ops import fused
module = fused.build(build_directory=sys.argv[1])
names = sorted(n for n in dir(module) if not n.startswith("_"))
print("EXPORTS", ",".join(names), "MAX_TOKENS", module.max_tokens)
"""


def test_kernel_sources_are_found():
    names = {path.name for path in kernel_build.kernel_sources()}
    assert {"bindings.cpp", "window_attention.cu", "window_process.cu"} <= names


@pytest.mark.nvcc
@pytest.mark.slow
@pytest.mark.timeout(3000)  # a cold build takes minutes on 2 busy cores (210 s measured)
def test_extension_compiles_with_nvcc():
    cuda_home = kernel_build.find_cuda_home()
    if cuda_home is None or torch.version.cuda is None:
        pytest.skip("no CUDA toolkit (nvcc) or a CPU-only torch: nothing to compile with")
    arch = os.environ.get("MSGFM_TEST_CUDA_ARCH", "8.0")
    sm = "sm_" + arch.replace(".", "")
    build_dir = REPO_ROOT / ".cache" / f"nvcc_test_{sm}"
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.setdefault("CUDA_HOME", cuda_home)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(build_dir)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=3000)
    elapsed = time.perf_counter() - started
    print(f"nvcc build for {sm} took {elapsed:.0f} s (build dir {build_dir})")
    assert result.returncode == 0, f"the CUDA extension does not compile for {sm}:\n" \
                                   f"{result.stdout[-6000:]}\n{result.stderr[-12000:]}"
    exports = result.stdout.split("EXPORTS", 1)[1].split()
    assert set(exports[0].split(",")) >= {"window_attention_forward", "window_attention_backward",
                                          "window_partition", "window_merge"}
    assert exports[-1] == "256"

"""Checks of the software stack and the GPUs: torch, CUDA, driver, compute capability,
fp16/bf16, DeepSpeed and its FusedAdam op, the ds_config's precision.

The decisions (does this torch build have code for that GPU? is this DeepSpeed new
enough?) are pure functions of their inputs, so the tests drive them with a V100 and a
CUDA 13 torch on a machine that has neither.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from msgfm.doctor.report import FAIL, OK, SKIP, WARN, Check, skipped

# Older DeepSpeed dispatches MoE tokens with dense one-hot einsums (docs/architecture.md, "DeepSpeed").
# setup.py states the same bound for pip (it cannot import msgfm).
MIN_DEEPSPEED = "0.19.4"
TORCH_CU12_HINT = ("install a torch built with CUDA 12.x first (e.g. `pip install torch --index-url <the PyTorch "
                   "cu126 index>`), then msgfm; see the README, section Installing")


def _arch_number(arch: str) -> tuple[str, int, int, str] | None:
    """'sm_90a' -> ('sm', 9, 0, 'a'); 'compute_120' -> ('compute', 12, 0, ''); None if unreadable."""
    match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([a-z]?)", arch)
    if not match:
        return None
    return match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)


def code_for_capability(capability: tuple[int, int], arch_list: Sequence[str]) -> str | None:
    """The entry of ``torch.cuda.get_arch_list()`` that runs on a GPU of ``capability``, or None.

    Machine code (sm_XY) runs on the same major version with an equal or higher minor one;
    arch-specific code (sm_90a) only on exactly that GPU; PTX (compute_XY) is compiled by
    the driver for any GPU at least as new."""
    major, minor = capability
    for arch in arch_list:
        parsed = _arch_number(arch)
        if parsed is None:
            continue
        kind, arch_major, arch_minor, suffix = parsed
        if kind == "sm" and arch_major == major and (arch_minor == minor if suffix else arch_minor <= minor):
            return arch
    for arch in arch_list:
        parsed = _arch_number(arch)
        if parsed and parsed[0] == "compute" and (parsed[1], parsed[2]) <= (major, minor):
            return arch
    return None


def arch_support_check(name: str, capability: tuple[int, int], arch_list: Sequence[str], torch_version: str,
                       cuda_version: str | None) -> Check:
    """Whether this torch build carries code for the GPU; a V100 under a CUDA 13 torch is told
    to install a CUDA 12.x build (CUDA 13 dropped sm_50 to sm_72)."""
    sm = f"sm_{capability[0]}{capability[1]}"
    row = f"torch code for {sm}"
    code = code_for_capability(capability, arch_list)
    if code is not None:
        how = "PTX, compiled by the driver at start" if code.startswith("compute") else "machine code"
        return Check(name=row, status=OK, result=f"{name}: {code} ({how}) in torch {torch_version}",
                     data={"arch": code})
    listed = ", ".join(arch_list) or "none"
    cuda_major = int(cuda_version.split(".")[0]) if cuda_version else 0
    if cuda_major >= 13 and capability < (7, 5):
        todo = f"{sm} needs a torch built with CUDA 12.x (CUDA 13 dropped sm_70): {TORCH_CU12_HINT}"
    else:
        todo = f"install a torch build whose torch.cuda.get_arch_list() includes {sm} (see the README, Installing)"
    return Check(name=row, status=FAIL, result=f"{name}: torch {torch_version} (CUDA {cuda_version}) has no code "
                 f"for {sm}; it has {listed}", todo=todo, data={"arch_list": list(arch_list)})


def deepspeed_version_check(version: str | None) -> Check:
    """DeepSpeed present and >= MIN_DEEPSPEED."""
    from packaging.version import InvalidVersion, Version

    if version is None:
        return Check(name="DeepSpeed", status=FAIL, result="not installed",
                     todo=f"pip install 'deepspeed>={MIN_DEEPSPEED}' (or pip install -e . in the msgfm checkout)")
    try:
        new_enough = Version(version) >= Version(MIN_DEEPSPEED)
    except InvalidVersion:
        return Check(name="DeepSpeed", status=WARN, result=f"version {version!r} is not readable",
                     todo=f"make sure it is >= {MIN_DEEPSPEED}")
    if not new_enough:
        return Check(name="DeepSpeed", status=FAIL, result=f"{version} < {MIN_DEEPSPEED}",
                     todo=f"pip install -U 'deepspeed>={MIN_DEEPSPEED}': older versions dispatch MoE tokens with "
                          f"dense one-hot einsums that cost more than the model")
    return Check(name="DeepSpeed", status=OK, result=f"{version} (>= {MIN_DEEPSPEED})", data={"version": version})


def bf16_native(device: int) -> bool:
    """bf16 the GPU computes in hardware (not emulated through fp32, as torch does on sm_70)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation
        return torch.cuda.get_device_capability(device) >= (8, 0)


def precision_check(index: int, name: str, capability: tuple[int, int], bf16: bool) -> Check:
    """fp16 (tensor cores from sm_70) and real bf16 (sm_80 and newer)."""
    fp16 = capability >= (7, 0)
    result = f"GPU {index} {name}: fp16 {'yes' if fp16 else 'no tensor cores'}, bf16 {'yes' if bf16 else 'no'}"
    if not fp16:
        return Check(name=f"fp16 / bf16 (GPU {index})", status=WARN, result=result,
                     todo="fp16 training runs without tensor cores here: expect it to be slow")
    if not bf16:
        return Check(name=f"fp16 / bf16 (GPU {index})", status=WARN, result=result + " (only emulated)",
                     todo="train in fp16 with loss scaling: ds_configs/v100x8.json, not a100x8_bf16.json")
    return Check(name=f"fp16 / bf16 (GPU {index})", status=OK, result=result, data={"fp16": fp16, "bf16": bf16})


def driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi, else None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def torch_check() -> Check:
    """torch, the CUDA runtime it was built with, and whether it sees a GPU."""
    cuda = torch.version.cuda
    build = f"CUDA {cuda} build" if cuda else "CPU-only build"
    seen = f"{torch.cuda.device_count()} CUDA device(s) visible" if torch.cuda.is_available() else \
        "no CUDA device visible"
    return Check(name="torch / CUDA runtime", status=OK, result=f"torch {torch.__version__}, {build}; {seen}",
                 data={"torch": torch.__version__, "cuda": cuda, "devices": torch.cuda.device_count()})


def driver_check() -> Check:
    """The driver version, and the newest CUDA it supports against the runtime torch needs."""
    if not torch.cuda.is_available():
        return skipped("NVIDIA driver")
    version = driver_version()
    api = getattr(torch._C, "_cuda_getDriverVersion", lambda: 0)()
    api_text = f"supports CUDA up to {api // 1000}.{api % 1000 // 10}" if api else "CUDA support unknown"
    return Check(name="NVIDIA driver", status=OK, result=f"{version or 'version unknown (no nvidia-smi)'}, {api_text}",
                 data={"driver": version, "driver_cuda_api": api})


def gpu_checks() -> list[Check]:
    """Per visible GPU: name, capability and memory; code in this torch build; fp16/bf16."""
    if not torch.cuda.is_available():
        return [skipped("GPUs"), skipped("torch code for the GPUs"), skipped("fp16 / bf16")]
    rows: list[Check] = []
    arch_list = torch.cuda.get_arch_list()
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        capability = (props.major, props.minor)
        memory = props.total_memory / 2**30
        rows.append(Check(name=f"GPU {index}", status=OK,
                          result=f"{props.name}, compute capability {props.major}.{props.minor}, {memory:.1f} GiB, "
                                 f"{props.multi_processor_count} SMs",
                          data={"name": props.name, "capability": f"{props.major}.{props.minor}",
                                "memory_gib": round(memory, 2)}))
        rows.append(arch_support_check(props.name, capability, arch_list, torch.__version__, torch.version.cuda))
        rows.append(precision_check(index, props.name, capability, bf16_native(index)))
    return rows


def cuda_toolkit_check() -> Check:
    """The nvcc that JIT builds (msgfm's kernels, DeepSpeed's FusedAdam) would use."""
    from msgfm.ops import kernel_build

    home = kernel_build.find_cuda_home()
    if home is None:
        status = WARN if torch.cuda.is_available() else SKIP
        return Check(name="CUDA toolkit (nvcc)", status=status, result="not found",
                     todo="needed only to JIT-build the fused kernels and FusedAdam: set CUDA_HOME to a folder "
                          "with bin/nvcc" if status == WARN else "")
    try:
        out = subprocess.run([str(Path(home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
        release = re.search(r"release ([\d.]+)", out)
    except (OSError, subprocess.TimeoutExpired):
        release = None
    version = release.group(1) if release else "version unknown"
    return Check(name="CUDA toolkit (nvcc)", status=OK, result=f"{home} (nvcc {version})",
                 data={"cuda_home": home, "nvcc": version})


def deepspeed_checks() -> list[Check]:
    """DeepSpeed's version, and on a GPU whether FusedAdam (msgfm's default optimizer there) loads
    or builds and takes one step."""
    try:
        import deepspeed

        version: str | None = deepspeed.__version__
    except ImportError:
        version = None
    rows = [deepspeed_version_check(version)]
    if version is None:
        return rows
    if not torch.cuda.is_available():
        rows.append(skipped("DeepSpeed FusedAdam",
                            "skipped: no CUDA device (FusedAdam is for GPUs; torch AdamW runs on CPU)"))
        return rows
    rows.append(fused_adam_check())
    return rows


def fused_adam_check() -> Check:
    """Load (or JIT-build) DeepSpeed's FusedAdam and take one AdamW step on a small CUDA tensor."""
    import time

    from msgfm.ops import kernel_build

    kernel_build.export_cuda_home()
    started = time.perf_counter()
    try:
        from deepspeed.ops.adam import FusedAdam

        param = torch.nn.Parameter(torch.randn(1024, device="cuda"))
        before = param.detach().clone()
        optimizer = FusedAdam([param], lr=1e-2, adam_w_mode=True)
        param.grad = torch.randn_like(param)
        optimizer.step()
        torch.cuda.synchronize()
        moved = bool(torch.isfinite(param).all()) and not torch.equal(param.detach(), before)
    except Exception as err:  # build errors arrive as RuntimeError/OSError with the compiler log
        text = f"{type(err).__name__}: {err}"
        return Check(name="DeepSpeed FusedAdam", status=FAIL, result=text.splitlines()[0][:200],
                     todo="set CUDA_HOME to the toolkit matching torch's CUDA and install ninja, or set "
                          "optimizer.implementation=torch", details=text[-3000:])
    seconds = time.perf_counter() - started
    if not moved:
        return Check(name="DeepSpeed FusedAdam", status=FAIL, result="one step left the parameter unchanged or "
                     "not finite", todo="report it: DeepSpeed's FusedAdam is broken on this GPU; meanwhile set "
                                        "optimizer.implementation=torch")
    return Check(name="DeepSpeed FusedAdam", status=OK, result=f"loads and steps ({seconds:.1f} s incl. any build)",
                 data={"seconds": round(seconds, 2)})


def ds_config_check(path: str, ds_config: dict[str, Any]) -> Check:
    """The ds_config's precision against what every visible GPU computes natively."""
    from msgfm.train.ds_config import precision

    prec = precision(ds_config)
    name = f"ds_config {Path(path).name}"
    if not torch.cuda.is_available():
        if prec == "fp32":
            return Check(name=name, status=OK, result="fp32: runs on CPU ranks")
        return Check(name=name, status=SKIP, result=f"skipped: {prec} needs a CUDA device",
                     todo="on CPU use ds_configs/cpu.json")
    lacking = [i for i in range(torch.cuda.device_count()) if prec == "bf16" and not bf16_native(i)]
    if lacking:
        return Check(name=name, status=FAIL, result=f"bf16, but GPU(s) {lacking} have no native bf16",
                     todo="use an fp16 ds_config with loss scaling (ds_configs/v100x8.json)")
    return Check(name=name, status=OK, result=f"{prec}: supported by the visible GPU(s)")

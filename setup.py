"""msgfm: pretrain and fine-tune msGFM (Han et al., CVPR 2024) on DeepSpeed.

Set ``MSGFM_BUILD_KERNELS=1`` to compile the fused CUDA window-attention kernels
ahead of time; otherwise they are compiled on first use (see msgfm/ops/fused.py).
"""
import os

from setuptools import find_packages, setup

# The backbone install (`pip install msgfm`): enough for msgfm.load_backbone, the timm names and an
# exported model (msgfm/backbone imports nothing else). Training and data need the extras below;
# the Makefile (the README's two commands) installs all of them.
RUNTIME = [
    # torch comes from the package registry; its CUDA build runs on CPU too.
    # V100 (sm_70) needs a CUDA 12.x build of torch: see the README.
    "torch>=2.4",
    "torchvision",  # pip picks the build that matches torch (timm needs it)
    "timm>=1.0",
    "numpy",
    "pyyaml>=6",
    "safetensors",  # exported weights; timm weights for fine-tuning baselines
]

TRAIN = [
    "deepspeed>=0.19.4",  # older versions dispatch MoE with dense one-hot einsums
    "mlflow>=3.0",  # tracking; exports are logged as MLflow 3 logged models
    "h5py>=3.8",
    "tqdm",  # progress bars for conversion and training
    "matplotlib",  # reconstruction and prediction figures
    "torchmetrics>=1.0",  # downstream metrics
    "ninja",  # JIT build of the fused kernels
    "packaging",  # version comparison in `msgfm doctor`
]

DATA = [
    "h5py>=3.8",
    "rasterio>=1.3",  # GeoTIFF reading in the converters
    "pyarrow>=12",  # BigEarthNet v2 metadata.parquet in the bigearthnet converter
    "pillow",  # JPEG/PNG reading in the imagefolder converter
    "tqdm",
]

DEV = [
    "pytest>=8",
    "pytest-timeout",
    "scikit-learn",  # independent reference for mAP
    "scikit-image",  # independent reference for SSIM / PSNR
    "ruff==0.17.6",  # lint and import order (make lint; pyproject.toml); pinned: new releases add rules
    "mypy==2.4.1",  # type check of the package (make lint); pinned for the same reason
    "terratorch==1.2.*",  # msgfm backbones in TerraTorch (tests/test_terratorch.py; brings torchgeo, Lightning)
]


def _ext_modules():
    """Ahead-of-time build of the fused CUDA kernels (MSGFM_BUILD_KERNELS=1): the same module name,
    sources and flags as the JIT build, all taken from msgfm/ops/kernel_build.py."""
    if os.environ.get("MSGFM_BUILD_KERNELS", "0") != "1":
        return [], {}
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    # Loaded by path: importing the msgfm package here would need its dependencies at build time.
    spec = importlib.util.spec_from_file_location("_msgfm_kernel_build",
                                                  os.path.join(here, "msgfm", "ops", "kernel_build.py"))
    kernel_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_build)
    if kernel_build.export_cuda_home() is None:  # before cpp_extension is imported: it reads CUDA_HOME once
        raise RuntimeError("MSGFM_BUILD_KERNELS=1 but no CUDA toolkit was found: set CUDA_HOME to a folder "
                           "with bin/nvcc, or unset MSGFM_BUILD_KERNELS to compile on first use")
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as err:  # pip's isolated build environment has no torch
        raise RuntimeError("MSGFM_BUILD_KERNELS=1 needs torch at build time: run "
                           "`MSGFM_BUILD_KERNELS=1 pip install --no-build-isolation -e .`") from err

    ext = CUDAExtension(
        name=kernel_build.EXTENSION_NAME,
        sources=[os.path.relpath(path, here) for path in kernel_build.kernel_sources()],
        include_dirs=[str(kernel_build.KERNEL_DIR)],
        extra_compile_args={"cxx": kernel_build.cxx_flags(), "nvcc": kernel_build.NVCC_FLAGS},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()

setup(
    name="msgfm",
    version="0.1.0",
    description="Multisensor geospatial foundation model (msGFM) pretraining and fine-tuning on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["msgfm", "msgfm.*"]),
    package_data={"msgfm": ["configs/*.yaml"]},
    include_package_data=True,
    install_requires=RUNTIME,
    extras_require={"train": TRAIN, "data": DATA, "dev": TRAIN + DATA + DEV},
    entry_points={"console_scripts": ["msgfm=msgfm.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

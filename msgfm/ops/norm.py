"""LayerNorm implementation switch: torch, or NVIDIA apex's FusedLayerNorm when installed.

apex is detected by what it provides (``apex.normalization``), never by the bare
name: the registry package called ``apex`` is an unrelated project.
"""
from __future__ import annotations

import importlib

from torch import nn


def apex_fused_layer_norm() -> tuple[type[nn.Module] | None, str]:
    """Return (FusedLayerNorm class, "") or (None, reason it is unavailable)."""
    try:
        module = importlib.import_module("apex.normalization")
    except Exception as err:  # ImportError, or an unrelated 'apex' package failing on import
        return None, f"NVIDIA apex is not installed ({type(err).__name__}: {err})"
    cls = getattr(module, "FusedLayerNorm", None)
    if cls is None:
        return None, "the installed 'apex' has no apex.normalization.FusedLayerNorm (is it NVIDIA apex?)"
    return cls, ""


def layer_norm_class(kind: str) -> type[nn.Module]:
    """The LayerNorm class for ``kernels.layernorm`` (``torch`` or ``apex``)."""
    if kind == "torch":
        return nn.LayerNorm
    if kind == "apex":
        cls, reason = apex_fused_layer_norm()
        if cls is None:
            raise RuntimeError(f"kernels.layernorm=apex: {reason}. Build NVIDIA apex from source "
                               f"(github.com/NVIDIA/apex) or set kernels.layernorm=torch")
        return cls
    raise ValueError(f"kernels.layernorm must be 'torch' or 'apex', got '{kind}'")

"""Optional NVIDIA apex, detected by what it provides, never by the bare name.

The package registry's ``apex`` is an unrelated project, so ``import apex`` succeeding
proves nothing: a class is used only when ``apex.normalization.FusedLayerNorm`` is an
``nn.Module`` subclass, or ``apex.optimizers.FusedAdam`` an ``Optimizer`` subclass.
Each probe returns (class, "") or (None, the reason), so callers can fall back to the
default path or fail with a message that says what to do.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

APEX_INSTALL_HINT = "build NVIDIA apex from source (github.com/NVIDIA/apex); the PyPI package 'apex' is unrelated"


def _probe(module_name: str, attribute: str, base: type) -> tuple[type | None, str]:
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or an unrelated 'apex' package failing on import
        return None, f"{module_name} is not importable ({type(err).__name__}: {err}): NVIDIA apex is not installed"
    cls = getattr(module, attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        return None, (f"the installed 'apex' has no {module_name}.{attribute} {base.__name__} subclass "
                      f"(is it NVIDIA apex?)")
    return cls, ""


def apex_fused_layer_norm() -> tuple[type[nn.Module] | None, str]:
    """(apex.normalization.FusedLayerNorm, "") or (None, why it is unavailable)."""
    return _probe("apex.normalization", "FusedLayerNorm", nn.Module)


def apex_fused_adam() -> tuple[type[torch.optim.Optimizer] | None, str]:
    """(apex.optimizers.FusedAdam, "") or (None, why it is unavailable). FusedAdam(adam_w_mode=True)
    is AdamW; it needs its parameters on a CUDA device."""
    return _probe("apex.optimizers", "FusedAdam", torch.optim.Optimizer)

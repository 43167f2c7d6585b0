"""LayerNorm implementation switch: torch, or NVIDIA apex's FusedLayerNorm when installed.

apex is detected by what it provides (``apex.normalization``), never by the bare
name: the registry package called ``apex`` is an unrelated project.
"""
from __future__ import annotations

from torch import nn

from msgfm.errors import UserError
from msgfm.ops.apex_support import APEX_INSTALL_HINT, apex_fused_layer_norm

__all__ = ["apex_fused_layer_norm", "layer_norm_class"]


def layer_norm_class(kind: str) -> type[nn.Module]:
    """The LayerNorm class for ``kernels.layernorm`` (``torch`` or ``apex``)."""
    if kind == "torch":
        return nn.LayerNorm
    if kind == "apex":
        cls, reason = apex_fused_layer_norm()
        if cls is None:
            raise RuntimeError(f"kernels.layernorm=apex: {reason}. Either {APEX_INSTALL_HINT}, "
                               f"or set kernels.layernorm=torch")
        return cls
    raise UserError(f"kernels.layernorm must be 'torch' or 'apex', got '{kind}'")

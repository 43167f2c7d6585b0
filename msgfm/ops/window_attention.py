"""Swin window attention with an implementation switch.

Shapes (legend): B_ = batch x windows (window index = b * nW + w, as window_partition
orders them), N = tokens per window (window_size**2), C = channels, H = heads,
D = C / H, T = relative-position table rows ((2 * window_size - 1) ** 2).

All implementations take the qkv projection output in its natural layout and
return what the output projection reads, so a fused kernel can replace the whole
chain without permute copies:

    qkv_BN3C [B_, N, 3C] -> softmax(q k^T * scale + bias + mask) v -> out_BNC [B_, N, C]

``eager`` is the reference (explicit matmuls); ``sdpa`` folds the relative
position bias and the shift mask into ``attn_mask`` of
``torch.nn.functional.scaled_dot_product_attention``; ``fused`` is the CUDA
kernel of msgfm/ops/fused.py.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F

from msgfm.errors import UserError

log = logging.getLogger(__name__)

ATTENTION_IMPLS = ("auto", "fused", "sdpa", "eager")
_logged_choices: set[tuple[str, ...]] = set()  # what was logged or warned once


def relative_position_bias(bias_table_TH: torch.Tensor, rel_index_NN: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Gather the [H, N, N] bias from its table."""
    bias_NNH = bias_table_TH[rel_index_NN.reshape(-1)].view(num_tokens, num_tokens, -1)
    return bias_NNH.permute(2, 0, 1).contiguous()


def _split_heads(qkv_BN3C: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B_, N, C3 = qkv_BN3C.shape
    qkv = qkv_BN3C.reshape(B_, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each [B_, H, N, D]
    return q, k, v


def attention_eager(qkv_BN3C: torch.Tensor, bias_table_TH: torch.Tensor, rel_index_NN: torch.Tensor,
                    mask_WNN: torch.Tensor | None, num_heads: int, scale: float) -> torch.Tensor:
    B_, N, C3 = qkv_BN3C.shape
    q, k, v = _split_heads(qkv_BN3C, num_heads)
    attn = (q * scale) @ k.transpose(-2, -1)  # [B_, H, N, N]
    attn = attn + relative_position_bias(bias_table_TH, rel_index_NN, N).unsqueeze(0)
    if mask_WNN is not None:
        nW = mask_WNN.shape[0]
        attn = attn.view(B_ // nW, nW, num_heads, N, N) + mask_WNN.unsqueeze(1).unsqueeze(0).to(attn.dtype)
        attn = attn.view(B_, num_heads, N, N)
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B_, N, C3 // 3)


def attention_sdpa(qkv_BN3C: torch.Tensor, bias_table_TH: torch.Tensor, rel_index_NN: torch.Tensor,
                   mask_WNN: torch.Tensor | None, num_heads: int, scale: float) -> torch.Tensor:
    B_, N, C3 = qkv_BN3C.shape
    q, k, v = _split_heads(qkv_BN3C, num_heads)
    bias_HNN = relative_position_bias(bias_table_TH, rel_index_NN, N).to(q.dtype)
    if mask_WNN is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias_HNN.unsqueeze(0), scale=scale)
    else:
        nW = mask_WNN.shape[0]
        # [nW, H, N, N], broadcast over the batch: only the small per-window tensor is materialised.
        attn_mask = bias_HNN.unsqueeze(0) + mask_WNN.unsqueeze(1).to(q.dtype)
        shape = (B_ // nW, nW, num_heads, N, -1)
        out = F.scaled_dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape),
                                             attn_mask=attn_mask, scale=scale).flatten(0, 1)
    return out.transpose(1, 2).reshape(B_, N, C3 // 3)


def fused_attention_available() -> tuple[bool, str]:
    """Whether the fused CUDA extension can be used, and if not, why."""
    try:
        from msgfm.ops import fused
    except ImportError as err:
        return False, f"msgfm.ops.fused could not be imported ({err})"
    return fused.available()


class FusedUnavailableError(RuntimeError):
    """An explicit ``fused`` implementation was requested but cannot run; the message says why."""


def resolve_fused(requested: str, device: torch.device, key: str, fallback: str) -> str:
    """Shared by the attention and window-process switches: ``auto``/``fused`` -> a concrete choice.

    ``auto`` takes ``fused`` on a CUDA device when the extension is available, else ``fallback``
    (with one warning per process when a CUDA device is there but the extension is not);
    ``fused`` raises :class:`FusedUnavailableError` with the reason. Each choice is logged once.
    """
    choice = requested
    if requested in ("auto", "fused"):
        ok, reason = (False, f"tensors are on {device.type}, not on a CUDA device") if device.type != "cuda" \
            else fused_attention_available()
        if ok:
            choice = "fused"
        elif requested == "fused":
            raise FusedUnavailableError(f"{key}=fused was requested but cannot run: {reason}. "
                                        f"Set {key}={fallback} (or auto to fall back automatically)")
        else:
            choice = fallback
            if device.type == "cuda" and ("fallback", reason) not in _logged_choices:
                _logged_choices.add(("fallback", reason))  # one warning for all the auto switches
                warnings.warn(f"the fused CUDA kernels are unavailable, so kernels.attention=auto uses sdpa and "
                              f"kernels.window_process=auto uses torch: {reason}", RuntimeWarning, stacklevel=3)
    if (key, requested, choice) not in _logged_choices:
        _logged_choices.add((key, requested, choice))
        log.info("%s: %s (requested %s, device %s)", key, choice, requested, device.type)
    return choice


def resolve_attention_impl(requested: str, device: torch.device) -> str:
    """Turn ``auto`` into a concrete implementation; explicit ``fused`` fails with the reason it cannot run."""
    if requested not in ATTENTION_IMPLS:
        raise UserError(f"kernels.attention: '{requested}' is not one of {ATTENTION_IMPLS}")
    return resolve_fused(requested, device, "kernels.attention", "sdpa")


def window_attention(qkv_BN3C: torch.Tensor, bias_table_TH: torch.Tensor, rel_index_NN: torch.Tensor,
                     mask_WNN: torch.Tensor | None, num_heads: int, scale: float, impl: str) -> torch.Tensor:
    """Window attention with relative position bias and optional shift mask; ``impl`` is concrete."""
    if impl == "eager":
        return attention_eager(qkv_BN3C, bias_table_TH, rel_index_NN, mask_WNN, num_heads, scale)
    if impl == "sdpa":
        return attention_sdpa(qkv_BN3C, bias_table_TH, rel_index_NN, mask_WNN, num_heads, scale)
    if impl == "fused":
        from msgfm.ops import fused

        return fused.window_attention(qkv_BN3C, bias_table_TH, rel_index_NN, mask_WNN, num_heads, scale)
    raise UserError(f"unknown attention implementation '{impl}' (resolve 'auto' first)")

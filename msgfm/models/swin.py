"""The shared Swin encoder of msGFM (Swin-B in the paper), laid out like timm's SwinTransformer.

Module and parameter names follow ``timm.models.swin_transformer.SwinTransformer`` (timm 1.0):
``layers.{i}.downsample.{norm,reduction}``, ``layers.{i}.blocks.{j}.{norm1, attn.qkv, attn.proj,
attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}``, ``norm``; a dense encoder plus a
:class:`~msgfm.models.embed.PatchEmbed` therefore *is* a timm Swin up to a prefix rename
(msgfm/models/adapter.py). As in timm, stages 1..3 start with a PatchMerging, every odd block
of a stage uses shifted windows, and a stage whose token grid is not larger than the window
attends over the whole grid (window = grid, no shift).

The encoder starts from patch embeddings (the per-sensor f_i live in msgfm/models/backbone.py).
Attention runs through :func:`msgfm.ops.window_attention`, with the implementation resolved
from ``kernels.attention`` on the input's device at every forward.

Legend: B batch, H/W token grid of the current stage, C channels, ws window side,
N = ws * ws tokens per window, nW windows per image.
"""
from __future__ import annotations

from typing import cast

import torch
from timm.layers import DropPath, Mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

from msgfm.config import NUM_PATCH_MERGES, KernelsConfig, ModelConfig, MoEConfig
from msgfm.errors import UserError
from msgfm.models.moe import MoEMlp, moe_modules
from msgfm.ops import (
    resolve_attention_impl,
    resolve_window_process_impl,
    window_attention,
    window_merge,
    window_partition,
)
from msgfm.ops.norm import layer_norm_class
from msgfm.ops.window_geometry import relative_position_index, shift_attention_mask


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    relative_position_index: torch.Tensor  # a buffer

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x_BNC: torch.Tensor, mask_WNN: torch.Tensor | None, impl: str) -> torch.Tensor:
        out_BNC = window_attention(self.qkv(x_BNC), self.relative_position_bias_table, self.relative_position_index,
                                   mask_WNN, self.num_heads, self.scale, impl)
        return self.proj_drop(self.proj(out_BNC))


class SwinBlock(nn.Module):
    """(Shifted-)window attention and an MLP (or DeepSpeed-MoE experts), each pre-norm + residual."""

    attn_mask: torch.Tensor | None  # a buffer: the shift mask at the configured resolution

    def __init__(self, dim: int, resolution: int, num_heads: int, window_size: int, shifted: bool,
                 mlp_ratio: float, qkv_bias: bool, drop: float, drop_path: float, norm_layer: type[nn.Module],
                 moe_cfg: MoEConfig | None = None) -> None:
        super().__init__()
        # timm's rule: a grid no larger than the window is one window, and shifting it is pointless.
        self.window_size = min(window_size, resolution)
        self.shift_size = self.window_size // 2 if shifted and resolution > window_size else 0
        self.resolution = resolution
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias=qkv_bias, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = MoEMlp(dim, hidden, moe_cfg, drop) if moe_cfg is not None else \
            Mlp(dim, hidden, act_layer=nn.GELU, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        mask = shift_attention_mask(resolution, resolution, self.window_size, self.shift_size) \
            if self.shift_size else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def _mask_for(self, H: int, W: int, device: torch.device) -> torch.Tensor | None:
        if not self.shift_size:
            return None
        if self.attn_mask is not None and (H, W) == (self.resolution, self.resolution):
            return self.attn_mask
        return shift_attention_mask(H, W, self.window_size, self.shift_size, device)  # other input sizes

    def forward(self, x_BHWC: torch.Tensor, attn_impl: str, window_impl: str) -> torch.Tensor:
        B, H, W, C = x_BHWC.shape
        windows_BNC = window_partition(self.norm1(x_BHWC), self.window_size, self.shift_size, window_impl)
        windows_BNC = self.attn(windows_BNC, self._mask_for(H, W, x_BHWC.device), attn_impl)
        attended_BHWC = window_merge(windows_BNC, self.window_size, self.shift_size, H, W, window_impl)
        x_BLC = (x_BHWC + self.drop_path1(attended_BHWC)).reshape(B, H * W, C)
        x_BLC = x_BLC + self.drop_path2(self.mlp(self.norm2(x_BLC)))
        return x_BLC.reshape(B, H, W, C)


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens -> one token of twice the width (timm's channel order)."""

    def __init__(self, dim: int, norm_layer: type[nn.Module]) -> None:
        super().__init__()
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x_BHWC: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x_BHWC.shape
        # Channel blocks ordered (row 0 col 0, row 1 col 0, row 0 col 1, row 1 col 1), as in Swin and timm.
        x = x_BHWC.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional PatchMerging, then ``depth`` blocks alternating plain and shifted windows."""

    @property
    def first_block(self) -> SwinBlock:
        return cast(SwinBlock, self.blocks[0])

    def __init__(self, in_dim: int, dim: int, resolution: int, depth: int, downsample: bool, num_heads: int,
                 window_size: int, mlp_ratio: float, qkv_bias: bool, drop: float, drop_paths: list[float],
                 norm_layer: type[nn.Module], moe_cfg: MoEConfig | None = None,
                 moe_blocks: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.downsample = PatchMerging(in_dim, norm_layer) if downsample else nn.Identity()
        self.blocks = nn.ModuleList([
            SwinBlock(dim, resolution, num_heads, window_size, shifted=j % 2 == 1, mlp_ratio=mlp_ratio,
                      qkv_bias=qkv_bias, drop=drop, drop_path=drop_paths[j], norm_layer=norm_layer,
                      moe_cfg=moe_cfg if j in moe_blocks else None)
            for j in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x_BHWC: torch.Tensor, attn_impl: str, window_impl: str) -> torch.Tensor:
        x_BHWC = self.downsample(x_BHWC)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Non-reentrant: MoE aux losses produced inside stay in the graph; RNG state is
                # restored for the recompute, so the gate routes the same tokens again.
                x_BHWC = checkpoint(block, x_BHWC, attn_impl, window_impl, use_reentrant=False)
            else:
                x_BHWC = block(x_BHWC, attn_impl, window_impl)
        return x_BHWC


class SwinEncoder(nn.Module):
    """Swin stages + final norm over patch embeddings [B, H/p, W/p, D] -> [B, H/32, W/32, 8D]."""

    def __init__(self, model_cfg: ModelConfig, kernels: KernelsConfig) -> None:
        super().__init__()
        if model_cfg.attn_drop_rate > 0:
            raise UserError("model.attn_drop_rate: msgfm.ops.window_attention has no attention dropout; "
                            "set it to 0 (the paper uses none)")
        self.kernels = kernels
        self.embed_dim = model_cfg.embed_dim
        self.num_features = model_cfg.num_features
        self.patch_size = model_cfg.patch_size
        self.img_size = model_cfg.img_size
        norm_layer = layer_norm_class(kernels.layernorm)
        moe = model_cfg.moe
        total_blocks = sum(model_cfg.depths)
        # Stochastic depth grows linearly over all blocks (plain floats: the model may be built on 'meta').
        rates = [model_cfg.drop_path_rate * k / max(total_blocks - 1, 1) for k in range(total_blocks)]
        self.layers = nn.ModuleList()
        first = 0
        for i, (depth, heads, res) in enumerate(zip(model_cfg.depths, model_cfg.num_heads,
                                                    model_cfg.stage_resolutions)):
            dim = self.embed_dim * 2**i
            self.layers.append(SwinStage(
                in_dim=dim // 2 if i else dim, dim=dim, resolution=res, depth=depth, downsample=i > 0,
                num_heads=heads, window_size=model_cfg.window_size, mlp_ratio=model_cfg.mlp_ratio,
                qkv_bias=model_cfg.qkv_bias, drop=model_cfg.drop_rate, drop_paths=rates[first:first + depth],
                norm_layer=norm_layer, moe_cfg=moe if moe.enabled else None,
                moe_blocks=tuple(moe.blocks.get(i, ())) if moe.enabled else ()))
            first += depth
        self.norm = norm_layer(self.num_features)
        self.apply(_init_weights)
        for stage, enabled in zip(self.stages, model_cfg.checkpointed_stages()):
            stage.grad_checkpointing = enabled

    @property
    def stages(self) -> list[SwinStage]:
        """The four stages, typed (``layers`` keeps timm's module name)."""
        return [cast(SwinStage, stage) for stage in self.layers]

    def check_grid(self, height: int, width: int) -> None:
        """Raise a ValueError unless a token grid of height x width fits the merges and the windows."""
        merges = 2**NUM_PATCH_MERGES
        if height % merges or width % merges:
            raise UserError(f"image {height * self.patch_size}x{width * self.patch_size} is not a multiple of "
                            f"the encoder stride {self.patch_size * merges} (patch {self.patch_size} x "
                            f"{merges}); model.img_size is {self.img_size}")
        for i, stage in enumerate(self.stages):
            h, w = height // 2**i, width // 2**i
            ws = stage.first_block.window_size
            if h % ws or w % ws:
                raise UserError(f"image {height * self.patch_size}x{width * self.patch_size}: stage {i}'s "
                                f"{h}x{w} token grid is not a multiple of its window {ws}; use "
                                f"model.img_size ({self.img_size}) or a size whose stage grids the windows divide")

    def forward_stages(self, x_BHWC: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(final normalized features [B, H/32, W/32, 8D], each stage's raw NHWC output, 4 tensors)."""
        if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != self.embed_dim:
            raise UserError(f"SwinEncoder expects patch embeddings [B, H, W, {self.embed_dim}], "
                            f"got {list(x_BHWC.shape)}")
        self.check_grid(x_BHWC.shape[1], x_BHWC.shape[2])
        attn_impl = resolve_attention_impl(self.kernels.attention, x_BHWC.device)
        window_impl = resolve_window_process_impl(self.kernels.window_process, x_BHWC.device)
        stages = []
        for stage in self.layers:
            x_BHWC = stage(x_BHWC, attn_impl, window_impl)
            stages.append(x_BHWC)
        return self.norm(x_BHWC), stages

    def forward(self, x_BHWC: torch.Tensor) -> torch.Tensor:
        """Patch embeddings [B, H, W, D] -> final normalized features [B, H/8, W/8, 8D]."""
        return self.forward_stages(x_BHWC)[0]

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE auxiliary losses of the last forward; None without MoE layers."""
        losses = [m.aux_loss for m in moe_modules(self).values() if m.aux_loss is not None]
        return torch.stack([loss.float() for loss in losses]).sum() if losses else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing for every stage (timm's contract); per stage: model.grad_checkpointing."""
        for stage in self.stages:
            stage.grad_checkpointing = enable


def _init_weights(module: nn.Module) -> None:
    """Swin's initialisation: truncated normal (std 0.02) linear weights and bias tables, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, WindowAttention):
        nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)

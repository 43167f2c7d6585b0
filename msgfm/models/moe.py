"""DeepSpeed-MoE experts in place of a Swin block's MLP, and the helpers around them.

The experts are ``deepspeed.moe.layer.MoE`` (top-k gate, capacity, all-to-all dispatch):
nothing of the routing is rewritten here. :class:`MoEMlp` adapts it to a Swin block
(tokens in, tokens out) and keeps what the last forward produced: the gate's auxiliary
(load-balancing) loss and its per-expert token counts.

Distributed setup. A DeepSpeed MoE layer with ``ep_size`` E needs an expert-parallel
process group of E ranks. ``deepspeed.initialize`` creates the groups and hands them to
every layer (``MoE.set_deepspeed_parallelism``); outside the engine (tests, evaluation)
call :func:`init_expert_groups` after ``deepspeed.init_distributed``. Do not call both on
one model: DeepSpeed's gate refuses a second group (an assertion in ``TopKGate``). With
``ep_size == 1`` the layer runs without any process group.

Legend: B batch, L tokens per sample, C channels, E experts, S = B * L tokens.
"""
from __future__ import annotations

import math

import torch
from deepspeed.moe.layer import MoE
from timm.layers import Mlp
from torch import nn

from msgfm.config import MoEConfig
from msgfm.errors import UserError


class MoEMlp(nn.Module):
    """``deepspeed.moe.layer.MoE`` with timm ``Mlp`` experts; forward returns only the tokens.

    After each forward, :attr:`aux_loss` holds the gate's auxiliary loss (a scalar with grad)
    and :attr:`exp_counts` the tokens routed to each expert before capacity drops (DeepSpeed's
    ``exp_counts``: local to this rank, pre-capacity). :meth:`load` turns them into logging
    numbers; nothing here forces a device-to-host sync during the forward.
    """

    def __init__(self, dim: int, hidden_dim: int, moe_cfg: MoEConfig, drop: float = 0.0) -> None:
        super().__init__()
        self.num_experts = moe_cfg.num_experts
        self.top_k = moe_cfg.top_k
        self.capacity_factor = moe_cfg.capacity_factor
        self.eval_capacity_factor = moe_cfg.eval_capacity_factor
        self.min_capacity = moe_cfg.min_capacity
        self.drop_tokens = moe_cfg.drop_tokens
        self.moe = MoE(hidden_size=dim, expert=Mlp(dim, hidden_dim, act_layer=nn.GELU, drop=drop),
                       num_experts=moe_cfg.num_experts, ep_size=moe_cfg.expert_parallel_size, k=moe_cfg.top_k,
                       capacity_factor=moe_cfg.capacity_factor, eval_capacity_factor=moe_cfg.eval_capacity_factor,
                       min_capacity=moe_cfg.min_capacity, drop_tokens=moe_cfg.drop_tokens,
                       use_residual=moe_cfg.use_residual)
        self.aux_loss: torch.Tensor | None = None
        self.exp_counts: torch.Tensor | None = None
        self.num_tokens = 0
        self.was_training = True

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        if self.moe.ep_size > 1 and self.moe.deepspeed_moe.ep_group is None:
            raise RuntimeError(f"MoE layer with expert_parallel_size={self.moe.ep_size} has no expert-parallel "
                               f"process group: run it inside deepspeed.initialize, or call "
                               f"msgfm.models.moe.init_expert_groups(model) after deepspeed.init_distributed()")
        out_BLC, self.aux_loss, self.exp_counts = self.moe(x_BLC)
        self.num_tokens = x_BLC.shape[0] * x_BLC.shape[1]
        self.was_training = self.training
        return out_BLC

    def capacity(self, num_tokens: int, training: bool) -> int:
        """Slots per expert for ``num_tokens`` tokens, as DeepSpeed's top-k gate computes them."""
        factor = self.capacity_factor if training else self.eval_capacity_factor
        return max(math.ceil(num_tokens / self.num_experts * factor * self.top_k), self.min_capacity)

    def load(self) -> dict[str, torch.Tensor | float | int]:
        """Expert load of the last forward on this rank (this call syncs with the device).

        ``tokens_per_expert`` [E]: routes chosen by the gate, before capacity drops;
        ``share`` [E]: their fraction; ``capacity``: slots per expert; ``dropped_fraction``:
        routes beyond capacity (not computed by an expert) over all routes (S * k).
        """
        if self.exp_counts is None:
            raise RuntimeError("expert load is only known after a forward pass")
        counts_E = self.exp_counts.detach().long().cpu()
        routes = int(counts_E.sum())
        if self.drop_tokens:
            cap = self.capacity(self.num_tokens, self.was_training)
            dropped = int((counts_E - cap).clamp(min=0).sum())
        else:  # DeepSpeed raises the capacity to the largest count: nothing is dropped
            cap, dropped = int(counts_E.max()), 0
        return {"tokens_per_expert": counts_E, "share": counts_E.float() / max(routes, 1),
                "capacity": cap, "dropped_fraction": dropped / max(routes, 1)}


def moe_modules(model: nn.Module) -> dict[str, MoEMlp]:
    """Every :class:`MoEMlp` of ``model`` by module name, in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEMlp)}


def init_expert_groups(model: nn.Module) -> int:
    """Create DeepSpeed's expert-parallel groups and attach them to every MoE layer of ``model``.

    For use outside ``deepspeed.initialize`` (which does this itself). Needs an initialized
    ``torch.distributed`` (``deepspeed.init_distributed()``; tests use a 1-rank gloo group).
    Layers that already have a group are left alone. Returns the number of layers set up.
    """
    import torch.distributed as dist

    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        return 0
    if not dist.is_initialized():
        raise RuntimeError("init_expert_groups needs torch.distributed: call deepspeed.init_distributed() first "
                           "(a 1-process gloo group is enough on CPU)")
    world = dist.get_world_size()
    done = 0
    for layer in layers:
        if world % layer.ep_size:
            raise UserError(f"model.moe.expert_parallel_size={layer.ep_size} does not divide the world size {world}; "
                            f"launch a multiple of {layer.ep_size} ranks or override "
                            f"model.moe.expert_parallel_size")
        if layer.deepspeed_moe.ep_group is None:
            layer.set_deepspeed_parallelism()
            done += 1
    return done


@torch.no_grad()
def reinit_experts(model: nn.Module, seed: int, ep_rank: int = 0, std: float = 0.02) -> None:
    """Give every expert of every MoE layer its own initial weights, the same on any world size.

    DeepSpeed builds the local experts as copies of one module, and ranks seeded alike
    would hold identical experts. Here global expert ``g = ep_rank * local + j`` of the
    ``l``-th MoE layer draws from a generator seeded with (seed, l, g): call it on every
    rank before ``deepspeed.initialize`` with the rank's expert-parallel index.
    """
    for layer_idx, layer in enumerate(m for m in model.modules() if isinstance(m, MoE)):
        local = layer.num_local_experts
        if not 0 <= ep_rank < layer.ep_size:
            raise UserError(f"ep_rank {ep_rank} outside [0, {layer.ep_size})")
        for j, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            gen = torch.Generator().manual_seed(hash((seed, layer_idx, ep_rank * local + j)) & (2**63 - 1))
            for module in expert.modules():
                if isinstance(module, nn.Linear):
                    weight = torch.empty(module.weight.shape)  # drawn on CPU: the generator lives there
                    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std, generator=gen)
                    module.weight.copy_(weight)
                    if module.bias is not None:
                        module.bias.zero_()

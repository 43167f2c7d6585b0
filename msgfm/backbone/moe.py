"""Top-1 mixture of experts in plain torch: msGFM's MoE layers without DeepSpeed.

It loads the same expert weights as ``deepspeed.moe.layer.MoE`` (top-1 gate, timm ``Mlp``
experts) and computes what DeepSpeed computes when no token is dropped (evaluation capacity =
number of experts, as fine-tuning uses): every token goes to the expert of its largest gate
probability, and that expert's output is scaled by the probability. Nothing is ever dropped
here, in training either; the auxiliary load-balancing loss of the last forward is kept in
:attr:`Top1MoE.aux_loss` for fine-tuning that wants it.

Weight names (the export's, see msgfm/backbone/model.py): ``gate.weight`` [E, C] (no bias)
and ``experts.<e>.{fc1,fc2}.{weight,bias}`` with global expert numbers e.

Legend: S tokens, C channels, E experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn


class Top1MoE(nn.Module):
    """``num_experts`` MLPs and a linear gate; each token is computed by the one expert it is routed to."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, drop: float = 0.0) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"Top1MoE needs at least one expert, got {num_experts}")
        self.num_experts = num_experts
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList([Mlp(dim, hidden_dim, act_layer=nn.GELU, drop=drop)
                                      for _ in range(num_experts)])
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens_SC = x.reshape(-1, shape[-1])
        # the gate runs in fp32 whatever the input dtype, as DeepSpeed's TopKGate does
        gates_SE = F.linear(tokens_SC.float(), self.gate.weight.float()).softmax(dim=-1)
        expert_S = gates_SE.argmax(dim=-1)
        weight_S1 = gates_SE.gather(1, expert_S[:, None]).to(tokens_SC.dtype)
        out_SC = torch.zeros_like(tokens_SC)
        for e, expert in enumerate(self.experts):
            picked = (expert_S == e).nonzero(as_tuple=True)[0]
            if picked.numel():
                out_SC = out_SC.index_add(0, picked, expert(tokens_SC[picked]) * weight_S1[picked])
        # load balancing (Switch / GShard form, DeepSpeed's l_aux): E * sum_e mean gate prob * token share
        share_E = F.one_hot(expert_S, self.num_experts).float().mean(0)
        self.aux_loss = (gates_SE.mean(0) * share_E).sum() * self.num_experts
        return out_SC.reshape(shape)

"""Per-GPU memory of parameters, gradients and optimizer states under ZeRO (the dry run's estimate).

With P_d dense parameters (replicated on every rank), P_e expert parameters in
total, world size W, expert-parallel size E (each rank holds P_e / E expert
parameters, replicated over the W / E ranks of its expert-data-parallel group)
and ZeRO stage s::

    params     = (P_d + P_e / E) * b_param
    grads      = P_d * b_grad / (W if s >= 2 else 1) + (P_e / E) * b_grad / (W / E if s >= 2 else 1)
    optimizer  = P_d * b_opt  / (W if s >= 1 else 1) + (P_e / E) * b_opt  / (W / E if s >= 1 else 1)

Bytes per parameter: fp16/bf16 keep 2-byte params and grads and a 12-byte fp32
optimizer state (master copy, Adam m and v); fp32 has 4-byte params and grads
and 8 bytes of Adam state (the params are the master copy). Activations,
communication buckets and the CUDA context come on top (activations depend on
batch size and activation checkpointing: measure them with msgfm.bench.train).
"""
from __future__ import annotations

from dataclasses import dataclass

from msgfm.errors import UserError

BYTES = {"fp16": (2, 2, 12), "bf16": (2, 2, 12), "fp32": (4, 4, 8)}  # (param, grad, optimizer) per parameter


@dataclass(frozen=True)
class MemoryEstimate:
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes


def estimate_memory(dense: int, expert: int, world_size: int, expert_parallel: int, zero_stage: int,
                    precision: str) -> MemoryEstimate:
    """Bytes per GPU for model states (see the module docstring for the formula)."""
    if precision not in BYTES:
        raise UserError(f"precision must be one of {sorted(BYTES)}, got {precision}")
    if world_size % expert_parallel:
        raise UserError(f"expert_parallel {expert_parallel} does not divide world size {world_size}")
    b_param, b_grad, b_opt = BYTES[precision]
    local_expert = expert / expert_parallel
    expert_dp = world_size // expert_parallel
    grad_div = (world_size, expert_dp) if zero_stage >= 2 else (1, 1)
    opt_div = (world_size, expert_dp) if zero_stage >= 1 else (1, 1)
    return MemoryEstimate(
        params_bytes=(dense + local_expert) * b_param,
        grads_bytes=dense * b_grad / grad_div[0] + local_expert * b_grad / grad_div[1],
        optimizer_bytes=dense * b_opt / opt_div[0] + local_expert * b_opt / opt_div[1],
    )

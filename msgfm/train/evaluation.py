"""Held-out loss at epoch ends: the task's metrics over each group's validation batches, averaged over ranks.

This is pretraining's evaluator (fine-tuning scores whole splits with the task's metric, see
msgfm/finetune/evaluate.py). Every rank runs the same number of batches per group (the
smallest count over ranks: MoE all-to-alls need the same sequence of forwards) and reduces one
fixed list of metric names (a rank may see no cross or self rows in its batches).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sized
from typing import TYPE_CHECKING, Any

import deepspeed.comm as dist
import torch

from msgfm.train import checkpoint as ckpt

if TYPE_CHECKING:
    from msgfm.train.trainer import Trainer


class HeldOutLoss:
    """``evaluator(trainer, epoch)``: mean metrics per group on the held-out batches, logged as ``val/...``."""

    def __init__(self, batches: Mapping[str, Iterable[dict[str, Any]]], max_batches: int | None) -> None:
        self.batches, self.max_batches = batches, max_batches

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    @torch.no_grad()
    def __call__(self, trainer: Trainer, epoch: int) -> dict[str, float]:
        engine, task, device = trainer.engine, trainer.task, trainer.device
        # validation draws masks too: keep it from shifting the training RNG streams (exact resume)
        rng = ckpt.rng_state()
        engine.eval()
        results: dict[str, float] = {}
        for group, batches in self.batches.items():
            limit = self.max_batches
            local = len(batches) if isinstance(batches, Sized) else (limit or 0)
            count = torch.tensor([min(local, limit) if limit else local], dtype=torch.long, device=device)
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            n = int(count.item())
            keys = task.metric_keys(group)
            sums_K = torch.zeros(len(keys), device=device, dtype=torch.float64)
            counts_K = torch.zeros_like(sums_K)
            for i, batch in enumerate(batches):
                if i >= n:
                    break
                out = engine(task.prepare(batch, group, device, trainer.dtype), group)
                for k, key in enumerate(keys):
                    if key in out["metrics"]:
                        sums_K[k] += out["metrics"][key].double()
                        counts_K[k] += 1
            if n == 0:
                continue
            totals = torch.stack([sums_K, counts_K])
            dist.all_reduce(totals)
            for key, total, count in zip(keys, *totals.tolist()):
                if count > 0:
                    results[f"val/{group}/{key}"] = total / count
        engine.train()
        ckpt.set_rng_state(rng)
        if results:
            trainer.tracker.log_metrics({**results, "epoch": float(epoch)}, trainer.step)
            if trainer.rank == 0:
                shown = " ".join(f"{k[4:]}={v:.4f}" for k, v in results.items() if k.endswith("/recon_loss"))
                print(f"validation after epoch {epoch}: {shown}", flush=True)
        return results

"""Weights are data, not code: load what a user may have got from someone else without unpickling code.

A ``torch.load(..., weights_only=False)`` of a file can import and call anything its pickle
names, so a checkpoint downloaded from elsewhere could run code on the user's machine. Every
file msgfm reads that may come from elsewhere goes through :func:`load_weights`: pretrained
msGFM checkpoints (fine-tuning's ``--pretrained``), fine-tuned weights (``--checkpoint``) and
timm weights. It reads ``.safetensors`` files with safetensors and everything else with
``torch.load(weights_only=True)``, which rebuilds tensors, containers and plain values only.
A file that needs more is refused with one line that says what to do.

Full unpickling is left to one place: DeepSpeed's own ``load_checkpoint`` when a run resumes
from its own ``--output-dir`` (its optimizer files hold DeepSpeed objects), together with the
run's per-rank state files beside it (random generator states). See docs/reliability.md.
"""
from __future__ import annotations

import pickle
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from msgfm.errors import MissingFileError, UserError


class UnsafeCheckpointError(UserError):
    """A weights file that cannot be loaded as data only (its pickle would import or call code)."""


@lru_cache(maxsize=1)
def _harmless_globals() -> tuple[Any, ...]:
    """Classes DeepSpeed pickles into model-states files that hold plain attributes only.

    A ZeRO-0 fp16 checkpoint keeps the optimizer state, loss scaler object included, in
    ``mp_rank_00_model_states.pt``; allowing these classes builds them without running code.
    """
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    except Exception:  # DeepSpeed absent or unimportable here: nothing to allow
        return ()
    return (LossScaler, DynamicLossScaler)


def load_weights(path: str | Path, what: str) -> Any:
    """The contents of a ``.safetensors`` or torch file, loaded as data only, on the CPU.

    ``what`` names the file for the messages (e.g. "pretrained weights"). Raises
    :class:`UnsafeCheckpointError` when the file would need code to load, and ``ValueError``
    when it is not a readable torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file ({what})")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path}: {what} are not a readable safetensors file ({err})") from None
    try:
        with torch.serialization.safe_globals(list(_harmless_globals())):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the first global it refused: "Unsupported global: GLOBAL x.y ..." or "unsupported GLOBAL x.y ..."
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(err))
        needs = f"'{found.group(1)}'" if found else "objects beyond tensors and plain values"
        raise UnsafeCheckpointError(
            f"{path}: refusing to load {what}: the file needs {needs} to be imported and run, and msgfm loads "
            f"weights as data only (torch.load weights_only=True). If you trust its source, re-save its "
            f"tensors as a plain state dict (torch.save(state_dict)) or as .safetensors and pass that file") from None
    except (RuntimeError, EOFError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: {what} are not a readable torch file ({first}); "
                        f"download or copy it again") from None

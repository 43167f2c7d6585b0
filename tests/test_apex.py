"""apex is optional and detected by capability: without NVIDIA apex the default paths are used,
and an unrelated module called `apex` is never mistaken for it."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from msgfm.ops.apex_support import apex_fused_adam, apex_fused_layer_norm
from msgfm.ops.norm import layer_norm_class


def _install_fake_apex(monkeypatch, **submodules: dict[str, object]) -> None:
    """Put a module tree `apex`, `apex.<name>` with the given attributes into sys.modules."""
    root = types.ModuleType("apex")
    monkeypatch.setitem(sys.modules, "apex", root)
    for name, attributes in submodules.items():
        module = types.ModuleType(f"apex.{name}")
        for key, value in attributes.items():
            setattr(module, key, value)
        setattr(root, name, module)
        monkeypatch.setitem(sys.modules, f"apex.{name}", module)


@pytest.fixture
def no_apex(monkeypatch):
    """Make `import apex...` fail whether or not apex is installed here."""
    for name in ("apex", "apex.normalization", "apex.optimizers"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import raise ImportError


def test_without_apex_the_default_paths_are_used(no_apex):
    assert layer_norm_class("torch") is nn.LayerNorm
    cls, reason = apex_fused_layer_norm()
    assert cls is None and "not installed" in reason
    cls, reason = apex_fused_adam()
    assert cls is None and "not installed" in reason
    with pytest.raises(RuntimeError, match="kernels.layernorm=apex: .*NVIDIA apex.*kernels.layernorm=torch"):
        layer_norm_class("apex")


def test_an_unrelated_apex_package_is_not_nvidia_apex(monkeypatch):
    # The registry's `apex` imports fine but has neither apex.normalization nor apex.optimizers.
    _install_fake_apex(monkeypatch)
    monkeypatch.setitem(sys.modules, "apex.normalization", None)
    monkeypatch.setitem(sys.modules, "apex.optimizers", None)
    assert apex_fused_layer_norm()[0] is None
    assert apex_fused_adam()[0] is None
    with pytest.raises(RuntimeError, match="kernels.layernorm=apex"):
        layer_norm_class("apex")


def test_modules_with_the_right_names_but_wrong_types_are_rejected(monkeypatch):
    _install_fake_apex(monkeypatch, normalization={"FusedLayerNorm": lambda dim: None},
                       optimizers={"FusedAdam": object})
    cls, reason = apex_fused_layer_norm()
    assert cls is None and "is it NVIDIA apex" in reason
    cls, reason = apex_fused_adam()
    assert cls is None and "FusedAdam Optimizer subclass" in reason


def test_nvidia_apex_is_found_by_what_it_provides(monkeypatch):
    class FusedLayerNorm(nn.LayerNorm):
        pass

    class FusedAdam(torch.optim.AdamW):
        pass

    _install_fake_apex(monkeypatch, normalization={"FusedLayerNorm": FusedLayerNorm},
                       optimizers={"FusedAdam": FusedAdam})
    assert layer_norm_class("apex") is FusedLayerNorm
    assert apex_fused_adam() == (FusedAdam, "")


def test_unknown_layernorm_kind_is_a_value_error():
    with pytest.raises(ValueError, match="kernels.layernorm must be 'torch' or 'apex'"):
        layer_norm_class("rms")

"""Task heads: output shapes at several input sizes, every parameter learns, bad inputs fail clearly."""
from __future__ import annotations

import pytest
import torch

from msgfm.tasks.heads import LinearHead, RestorationDecoder, UPerNetHead

CHANNELS = [8, 16, 32, 64]


def _features(batch: int, size: int, channels=CHANNELS) -> list[torch.Tensor]:
    return [torch.randn(batch, c, size // 4 // 2**i, size // 4 // 2**i, requires_grad=True)
            for i, c in enumerate(channels)]


def _assert_all_grads(module: torch.nn.Module) -> None:
    missing = [n for n, p in module.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, f"parameters without gradient: {missing}"


def test_linear_head_shape_and_grad():
    head = LinearHead(64, 19, dropout=0.1)
    feats = _features(3, 64)
    logits = head(feats)
    assert logits.shape == (3, 19)
    logits.sum().backward()
    _assert_all_grads(head)
    assert feats[-1].grad is not None and feats[0].grad is None  # pooled last stage only


@pytest.mark.parametrize("size,norm", [(64, "bn"), (96, "gn")])
def test_upernet_shapes_and_grads(size, norm):
    head = UPerNetHead(CHANNELS, num_classes=6, channels=16, norm=norm)
    feats = _features(2, size)
    logits = head(feats)
    assert logits.shape == (2, 6, size // 4, size // 4)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 6, (2, size // 4, size // 4))).backward()
    _assert_all_grads(head)
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)  # every stage is used


def test_upernet_group_norm_runs_at_batch_one():
    head = UPerNetHead(CHANNELS, num_classes=6, channels=16, norm="gn").eval()
    assert head(_features(1, 64)).shape == (1, 6, 16, 16)  # the 1x1 pyramid level normalizes over 4 channels


def test_upernet_rejects_wrong_stage_count():
    head = UPerNetHead(CHANNELS, num_classes=6, channels=16)
    with pytest.raises(ValueError, match="4 stages"):
        head(_features(2, 64)[:3])
    with pytest.raises(ValueError, match="norm"):
        UPerNetHead(CHANNELS, num_classes=6, norm="ln")


@pytest.mark.parametrize("size", [64, 96])
def test_restoration_decoder_residual_and_grads(size):
    decoder = RestorationDecoder(CHANNELS, image_channels=5, out_channels=4, widths=(32, 16, 16, 8, 8))
    feats = _features(2, size)
    image = torch.randn(2, 5, size, size)
    base = torch.randn(2, 4, size, size)
    out = decoder(feats, image, base)
    assert out.shape == (2, 4, size, size)
    # starts near the identity on the base image
    assert (out - base).abs().max() < 0.1
    ((out - base.flip(0)) ** 2).mean().backward()
    _assert_all_grads(decoder)
    assert decoder(feats, image).shape == (2, 4, size, size)  # no base: the raw prediction


def test_restoration_decoder_errors():
    with pytest.raises(ValueError, match="widths needs 5"):
        RestorationDecoder(CHANNELS, image_channels=3, out_channels=3, widths=(8, 8))
    decoder = RestorationDecoder(CHANNELS, image_channels=3, out_channels=3, widths=(8, 8, 8, 8, 8))
    with pytest.raises(ValueError, match="residual base"):
        decoder(_features(1, 64), torch.randn(1, 3, 64, 64), torch.randn(1, 4, 64, 64))

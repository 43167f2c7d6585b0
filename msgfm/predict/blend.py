"""Sliding windows over a scene with overlap blending, in bounded memory.

Tiles of ``tile`` x ``tile`` pixels step by ``tile x (1 - overlap)``; the last tile of a row or
column is flush with the scene's edge, and a scene side shorter than a tile is one zero-padded
tile. Each tile's output is weighted by a separable trapezoid (1 in the middle, a linear ramp
over the overlap width on each side, never 0), so a pixel's value is the weight-averaged output of
every tile that saw it and the seams between tiles fade instead of jumping: ramps of neighbouring
tiles cross where they overlap. Where only one tile sees a pixel (the scene's border) its output
is used as is.

Memory: tiles are read one batch at a time and the sums live in one strip of ``tile`` rows by the
scene's width; once a row of tiles is done, the rows no later tile touches are finished, handed to
``write_rows`` and dropped. Nothing scales with the scene's height, and only a strip with the
scene's width.

Legend: B tiles, C input channels, K output channels, T tile side, W scene width.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from msgfm.errors import UserError
from msgfm.tasks.downstream import window_starts

# forward(positions) -> outputs: the (top, left) of a batch of tiles -> their outputs [B, K, T, T]
Forward = Callable[[list[tuple[int, int]]], Tensor]


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Tile offsets along one side of ``size`` pixels (one tile when the side is shorter than a tile)."""
    if not 0 <= overlap < 1:
        raise UserError(f"--overlap must be in [0, 1), got {overlap}")
    return [0] if size <= tile else window_starts(size, tile, overlap)


def window_weight(tile: int, overlap: float) -> Tensor:
    """The [T, T] blending weight: a separable trapezoid ramping over the overlap width, > 0 everywhere."""
    ramp = tile - max(1, int(tile * (1 - overlap)))  # the overlap width in pixels (window_starts' step)
    if ramp <= 0:
        return torch.ones(tile, tile)
    position = torch.arange(tile, dtype=torch.float64) + 0.5
    side = torch.minimum(position, tile - position) / ramp  # distance to the nearer edge, in ramps
    weight_T = side.clamp(max=1.0)
    return torch.outer(weight_T, weight_T).float()


def tiles_of(height: int, width: int, tile: int, overlap: float) -> list[list[tuple[int, int]]]:
    """(top, left) of every tile, one list per row of tiles, top to bottom."""
    lefts = tile_starts(width, tile, overlap)
    return [[(top, left) for left in lefts] for top in tile_starts(height, tile, overlap)]


def blend_scene(forward: Forward, *, height: int, width: int, channels: int, tile: int, overlap: float,
                batch_size: int, write_rows: Callable[[int, Tensor], None],
                on_tiles: Callable[[int], None] = lambda n: None) -> None:
    """Run ``forward`` over every tile of a ``height`` x ``width`` scene and hand out the blended output
    ``[K, rows, W]`` strip by strip, top to bottom: ``write_rows(first_row, values)``.

    ``forward`` gets a batch of (top, left) tile positions and returns their outputs ``[B, K, T, T]``
    (the part of a tile beyond the scene is ignored); ``on_tiles(n)`` counts progress.
    """
    weight_TT = window_weight(tile, overlap)
    rows = tiles_of(height, width, tile, overlap)
    strip = min(tile, height)
    total_KSW = torch.zeros(channels, strip, width)
    weights_SW = torch.zeros(strip, width)
    for i, row in enumerate(rows):
        top = row[0][0]  # the strip's first row is this row of tiles' top
        for batch in _batches(row, batch_size):
            out_BKTT = forward(batch).float().cpu()
            for (_, left), out_KTT in zip(batch, out_BKTT):
                h, w = min(tile, height - top), min(tile, width - left)
                total_KSW[:, :h, left:left + w] += out_KTT[:, :h, :w] * weight_TT[:h, :w]
                weights_SW[:h, left:left + w] += weight_TT[:h, :w]
            on_tiles(len(batch))
        finished = (rows[i + 1][0][0] if i + 1 < len(rows) else height) - top
        write_rows(top, total_KSW[:, :finished] / weights_SW[:finished])
        # move the unfinished rows up; the rows below them start empty
        total_KSW = torch.cat([total_KSW[:, finished:], torch.zeros(channels, finished, width)], dim=1)
        weights_SW = torch.cat([weights_SW[finished:], torch.zeros(finished, width)], dim=0)


def _batches(items: list[tuple[int, int]], size: int) -> Iterator[list[tuple[int, int]]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]

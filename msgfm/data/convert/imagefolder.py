"""``msgfm convert imagefolder``: folders of RGB JPG/PNG/TIF images (MillionAID, GeoPile) to unpaired shards.

Each image is converted to 8-bit RGB, resized so that its shorter side is ``--size``
(bicubic) and center-cropped to ``--size`` x ``--size``. Files that cannot be decoded
(corrupt, truncated, not 8-bit imagery) are skipped and reported.
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
from PIL import Image

from msgfm.data.convert.common import (
    LoadResult,
    Sample,
    SkipItem,
    add_common_args,
    find_inputs,
    positive_int,
    run_from_args,
)
from msgfm.data.format import SensorArraySpec
from msgfm.errors import MissingFileError

SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
# PIL modes that convert to RGB without losing meaning; 16-bit or float images need the geotiff converter.
_RGB_CONVERTIBLE = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1"}


def find_images(root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The images under ``root`` (through linked folders) and (path, reason) of the links left out."""
    return find_inputs(root, SUFFIXES)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic), then the central size x size square."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: Path, *, root: Path, size: int) -> LoadResult:
    try:
        with Image.open(path) as image:
            if image.mode not in _RGB_CONVERTIBLE:
                raise SkipItem(f"mode {image.mode} is not 8-bit imagery; convert it with `msgfm convert geotiff`")
            image.load()  # decode now: a truncated file fails here, not later
            rgb = resize_center_crop(image.convert("RGB"), size)
    except Image.DecompressionBombError as err:
        raise SkipItem(f"refused by Pillow as too large: {err}") from None
    array_CHW = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    sample_id = path.relative_to(root).with_suffix("").as_posix()
    return LoadResult(samples=[Sample(sample_id=sample_id, images={"rgb": np.ascontiguousarray(array_CHW)})])


def convert(args: argparse.Namespace) -> int:
    if not args.root.is_dir():
        raise MissingFileError(f"{args.root} is not a folder of images")
    paths, left_out = find_images(args.root)
    if not paths:
        raise MissingFileError(f"no {'/'.join(SUFFIXES)} file under {args.root}")
    sensors = {"rgb": SensorArraySpec(dtype="uint8", channels=3, height=args.size, width=args.size,
                                      gsd_m=args.gsd_m)}
    run_from_args(args, items=paths, load=functools.partial(load_image, root=args.root, size=args.size),
                  group=args.group, sensors=sensors, source=f"image folder: {args.root}", description="imagefolder",
                  skipped_before=left_out)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "imagefolder", help="folders of RGB JPG/PNG/TIF images -> unpaired rgb shards",
        description="Converts every JPG/PNG/TIF under ROOT (recursively) to 8-bit RGB, shorter side resized to "
                    "--size with bicubic interpolation, then center-cropped. Unreadable images are skipped.")
    parser.add_argument("root", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--size", type=positive_int, default=192, help="output size in pixels (default 192)")
    parser.add_argument("--gsd-m", type=float, default=None, help="ground sample distance in metres, if known")
    parser.add_argument("--group", default="rgb", help="data group written in the shards (default rgb)")
    add_common_args(parser, prefix="images")
    parser.set_defaults(func=convert)

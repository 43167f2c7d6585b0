r"""``msgfm predict``: a fine-tuned model over georeferenced scenes of any size, written as a GeoTIFF.

    msgfm predict --model runs/ft_vaihingen --task vaihingen --input top.tif --input dsm.tif -o pred.tif
    msgfm predict --model runs/ft_spacenet --task spacenet --input pan.tif --input ms.tif \
        --band-order wv2_ms=red,green,blue,nir1 -o sharpened.tif

One ``--input`` per input sensor of the model, in its order (or ``SENSOR=PATH``). The output has the
first input's CRS, transform and size. The pieces: :mod:`~msgfm.predict.model` (where models come
from), :mod:`~msgfm.predict.scene` (input rasters, checks, windowed reads),
:mod:`~msgfm.predict.blend` (sliding windows, overlap blending in bounded memory),
:mod:`~msgfm.predict.run` (the command's work, the output). torch, DeepSpeed and rasterio are
imported when the command runs, so ``msgfm --help`` stays quick. See docs/predict.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from msgfm.config.finetune import TASKS


def _run(args: argparse.Namespace) -> int:
    from msgfm.predict.run import predict

    predict(model=args.model, task=args.task, inputs=args.input, out=args.out, output=args.output,
            band_orders=args.band_order or [], overlap=args.overlap, batch_size=args.batch_size, device=args.device,
            progress=not args.quiet)
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``msgfm predict``."""
    p = subparsers.add_parser("predict", help="run a fine-tuned model over a georeferenced scene -> GeoTIFF",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, metavar="RUN_OR_EXPORT",
                   help="a fine-tuning run folder (launchers/finetune.py --output-dir), its best/model.pt, "
                        "or the msgfm export folder of a fine-tuning run")
    p.add_argument("--task", required=True, choices=TASKS, help="the task the model was fine-tuned for")
    p.add_argument("--input", required=True, action="append", metavar="[SENSOR=]RASTER",
                   help="the raster of one input sensor (repeat, in the model's sensor order)")
    p.add_argument("-o", "--out", required=True, type=Path, metavar="PRED.tif", help="the GeoTIFF to write")
    p.add_argument("--output", default=None, choices=("classes", "probabilities"),
                   help="classification / segmentation: class map (default) or per-class probabilities")
    p.add_argument("--band-order", action="append", metavar="SENSOR=B1,B2,...",
                   help="the file's bands by name when they are not in the sensor's storage order")
    p.add_argument("--overlap", type=float, default=None,
                   help="tile overlap in [0, 1) (default: the task's eval_overlap)")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per forward pass (default 8)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)

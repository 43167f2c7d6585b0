"""``msgfm export RUN_OR_CHECKPOINT -o DIR``: a trained msGFM as a self-describing, DeepSpeed-free export.

Reads a pretraining checkpoint (run folder, ``checkpoints`` folder or one checkpoint; any number
of ranks and expert-parallel size, dense or MoE) or a fine-tuning run folder, and writes
``model.safetensors``, ``config.json`` and a model card ``README.md`` (docs/export.md); a fine-tuning run
also gives ``task/`` (its whole task module in safetensors, config and inputs), which makes the
export a model ``msgfm predict --model`` runs. When the
run was tracked in MLflow (or with ``--mlflow-run``), the export is logged there as a logged model.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from msgfm.errors import UserError
from msgfm.export.writer import export

__all__ = ["add_parser", "export"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a trained model: model.safetensors, config.json, README.md",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="pretraining run folder, checkpoints folder or checkpoint; or a fine-tuning run folder")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="the export folder (created)")
    p.add_argument("--sensors", default=None, metavar="S1,S2",
                   help="export only these sensors' embeddings (default: every sensor the model has)")
    p.add_argument("--dense-only", action="store_true",
                   help="refuse a model with MoE layers: the export is then a plain Swin that timm's own "
                        "swin_* architecture loads")
    p.add_argument("--decoders", action="store_true", help="also export the SimMIM decoders of the sensors")
    p.add_argument("--mlflow-run", default=None, metavar="RUN_ID",
                   help="log the export as a logged model of this MLflow run (default: the run folder's own run, "
                        "when it was tracked); the store is MLFLOW_TRACKING_URI or the run's")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the export to MLflow")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sensors = [s.strip() for s in args.sensors.split(",") if s.strip()] if args.sensors else None
    out = Path(args.output)
    config, source = export(args.source, out, sensors=sensors, dense_only=args.dense_only, decoders=args.decoders)
    arch = config["architecture"]
    print(f"exported {source.kind} checkpoint {source.name} (step {source.step}) to {out}: sensors "
          f"{list(config['sensors'])}, {config['weights']['parameters']:,} parameters, "
          f"{'dense' if arch['moe'] is None else str(arch['moe']['num_experts']) + ' experts'}"
          f"{'' if not config['task'] else ', with task/ for msgfm predict --task ' + str(config['task']['name'])}")
    run_id = args.mlflow_run or source.mlflow_run_id
    if run_id and not args.no_mlflow:
        from msgfm.export.mlflow_model import log_export

        uri = os.environ.get("MLFLOW_TRACKING_URI") or source.tracking_uri
        if uri is None:
            raise UserError(f"--mlflow-run {run_id}: {args.source} is not inside a run folder, so its MLflow store "
                            f"is unknown; set MLFLOW_TRACKING_URI")
        try:
            model_id = log_export(out, config, uri, run_id, source.run_dir)
        except Exception as err:
            if args.mlflow_run:  # asked for explicitly: a failure is the command's failure
                raise
            # the run's own MLflow store, unreachable or changed: the export itself is written and stays valid
            print(f"msgfm export: {out} is written; logging it to MLflow run {run_id} at {uri} failed "
                  f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); log it later with "
                  f"--mlflow-run {run_id}, or pass --no-mlflow", file=sys.stderr)
            return 0
        print(f"logged to MLflow run {run_id} as logged model {model_id} ({uri})")
    return 0

"""The export as an MLflow logged model of the run that trained it (MLflow 3 logged models).

The logged model carries the export's files as its artifacts, the architecture and provenance
as params, and the run it came from as its source run, so the MLflow UI shows which run
produced which backbone. Its tag ``msgfm.export_dir`` is the export folder relative to the run
folder when it lies inside it (a moved run folder keeps pointing at it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from msgfm.errors import UserError


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """The architecture, sensors and provenance as MLflow params (strings, dotted keys)."""
    arch, prov = config["architecture"], config["provenance"]
    params = {f"architecture.{k}": json.dumps(v) if not isinstance(v, str) else v for k, v in arch.items()}
    params["sensors"] = ",".join(config["sensors"])
    params.update({f"sensors.{s}.bands": ",".join(e["bands"]) for s, e in config["sensors"].items()})
    params.update({"provenance.step": str(prov["step"]), "provenance.config_hash": prov["config_hash"],
                   "provenance.checkpoint": prov["checkpoint"],
                   "weights.parameters": str(config["weights"]["parameters"])})
    return params


def log_export(out: Path, config: dict[str, Any], uri: str, run_id: str, run_dir: Path | None) -> str:
    """Log the export folder ``out`` as a logged model of MLflow run ``run_id`` at ``uri``; returns its id."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise UserError(f"MLflow run {run_id} not found at {uri} ({str(err).splitlines()[0]}); pass --mlflow-run "
                        f"with a run of that store, set MLFLOW_TRACKING_URI, or use --no-mlflow") from None
    where = str(out.resolve())
    if run_dir is not None and out.resolve().is_relative_to(run_dir.resolve()):
        where = os.path.relpath(out.resolve(), run_dir.resolve())
    model = client.create_logged_model(
        run.info.experiment_id, name="msgfm-backbone", source_run_id=run_id, model_type="msgfm-backbone",
        params=flat_params(config), tags={"msgfm.export_dir": where, "msgfm.format": config["format"]})
    try:
        client.log_model_artifacts(model.model_id, str(out))
    except Exception:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    return str(model.model_id)

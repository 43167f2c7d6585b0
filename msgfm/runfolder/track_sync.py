"""``msgfm track-sync RUN_DIR``: replay a run folder into MLflow after an outage.

A run whose tracking server was down (or that ran with tracking off) still has everything in
its folder: ``metrics.jsonl``, ``figures/``, ``outputs/``, the resolved configs. This command
sends what the MLflow run does not hold yet: each metric value whose (name, step) is missing,
and each file whose name is missing from its artifact folder. Running it twice sends nothing
the second time. The MLflow run is the one named in ``mlflow_run_id`` when the store has it,
else a new run (its id is written to ``mlflow_run_id``, so a resumed training reopens it).

Where: ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``tracking.tracking_uri`` of the
run's ``config.yaml``, else the run folder's own SQLite store, as during training.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msgfm.errors import MissingFileError, UserError

# local files -> MLflow artifact folder, as training logs them (a figure per name is enough)
ARTIFACTS = [("config.yaml", "config"), ("ds_config.json", "config/ds"), ("stats.json", "config/stats"),
             ("transfer.txt", "transfer"), ("figures/*.png", "figures"), ("outputs/**/*.png", "figures"),
             ("outputs/**/*.csv", "tables"), ("best/model.pt", "best"), ("best/metrics.json", "best")]


@dataclass
class SyncReport:
    """What one sync sent."""

    run_id: str
    uri: str
    created: bool
    metrics_sent: int
    metrics_present: int
    files_sent: int


def _run_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]}); fix or remove it") from None
    return tree if isinstance(tree, dict) else {}


def _open_run(client: Any, uri: str, run_dir: Path, experiment: str, config: dict[str, Any]) -> tuple[str, bool]:
    """(run id, newly created): the run of ``mlflow_run_id`` if the store holds it, else a new one."""
    from mlflow.exceptions import MlflowException

    from msgfm.train.tracking import create_run

    id_file = run_dir / "mlflow_run_id"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        try:
            client.get_run(run_id)
            return run_id, False
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    params: dict[str, Any] = {"config": config}
    if (run_dir / "ds_config.json").is_file():
        params["ds_config"] = json.loads((run_dir / "ds_config.json").read_text())
    run_name = f"{config.get('name', 'msgfm')}-{run_dir.name}"
    run_id = create_run(client, uri, run_dir, experiment, run_name, params,
                        {"msgfm.synced_from": str(run_dir.resolve())}, {})
    return run_id, True


def _send_metrics(client: Any, run_id: str, run_dir: Path) -> tuple[int, int]:
    """(values sent, values MLflow already held)."""
    from mlflow.entities import Metric

    from msgfm.train.tracking import metric_name, read_metrics

    wanted: dict[str, dict[int, Metric]] = {}
    for row in read_metrics(run_dir / "metrics.jsonl"):
        stamp = int(float(row.get("time", 0)) * 1000)
        for key, value in row.items():
            if key in ("step", "time") or not isinstance(value, (int, float)):
                continue
            name = metric_name(key)
            wanted.setdefault(name, {}).setdefault(row["step"], Metric(name, float(value), stamp, row["step"]))
    present_keys = set(client.get_run(run_id).data.metrics)
    batch: list[Metric] = []
    present = 0
    for name, by_step in wanted.items():
        have = {m.step for m in client.get_metric_history(run_id, name)} if name in present_keys else set()
        present += sum(step in have for step in by_step)
        batch.extend(metric for step, metric in sorted(by_step.items()) if step not in have)
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i:i + 1000])
    return len(batch), present


def _send_files(client: Any, run_id: str, run_dir: Path) -> int:
    from msgfm.train.tracking import run_artifacts

    repository = run_artifacts(client, run_dir, run_id)  # relative locations resolve in the run folder
    listed: dict[str, set[str]] = {}
    sent = 0
    for pattern, artifact_path in ARTIFACTS:
        for path in sorted(run_dir.glob(pattern)):
            if artifact_path not in listed:
                listed[artifact_path] = {Path(a.path).name for a in repository.list_artifacts(artifact_path)}
            if path.is_file() and path.name not in listed[artifact_path]:
                repository.log_artifact(str(path), artifact_path)
                listed[artifact_path].add(path.name)
                sent += 1
    return sent


def sync(run_dir: Path, uri: str | None = None, experiment: str | None = None) -> SyncReport:
    """Send what the MLflow run of ``run_dir`` lacks; see the module docstring."""
    from msgfm.config import TrackingConfig
    from msgfm.train.tracking import HTTP_DEFAULTS, is_http, probe_server, tracking_uri

    if not (run_dir / "metrics.jsonl").is_file() and not (run_dir / "config.yaml").is_file():
        raise MissingFileError(f"{run_dir}: not an msgfm run folder (no metrics.jsonl or config.yaml); pass the "
                               f"--output-dir of a run")
    config = _run_config(run_dir)
    found = config.get("tracking")
    tracking: dict[str, Any] = found if isinstance(found, dict) else {}
    experiment = experiment or tracking.get("experiment") or "msgfm"
    uri = uri or tracking_uri(TrackingConfig(experiment=experiment, tracking_uri=tracking.get("tracking_uri")),
                              run_dir)
    if is_http(uri):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if (why := probe_server(uri)) is not None:
            raise UserError(f"MLflow at {uri} is unreachable ({why}); nothing was sent, run this again once it "
                            f"is up (or pass --tracking-uri)")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id, created = _open_run(client, uri, run_dir, experiment, config)
    sent, present = _send_metrics(client, run_id, run_dir)
    files = _send_files(client, run_id, run_dir)
    if created:
        client.set_terminated(run_id)
    return SyncReport(run_id, uri, created, sent, present, files)


def _run(args: argparse.Namespace) -> int:
    report = sync(args.run_dir, args.tracking_uri, args.experiment)
    how = "new MLflow run" if report.created else "MLflow run"
    print(f"track-sync {args.run_dir}: {report.metrics_sent} metric values sent ({report.metrics_present} "
          f"already there), {report.files_sent} files sent; {how} {report.run_id} at {report.uri}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``msgfm track-sync``."""
    p = subparsers.add_parser("track-sync", help="replay a run's metrics.jsonl, figures and configs into MLflow",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run folder (--output-dir of the run)")
    p.add_argument("--tracking-uri", default=None, help="where to send it (see above for the default)")
    p.add_argument("--experiment", default=None, help="MLflow experiment of a new run (default: "
                   "tracking.experiment of the run's config.yaml)")
    p.set_defaults(func=_run)

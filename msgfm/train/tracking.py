"""MLflow tracking on rank 0, off the training thread.

Every call (:meth:`Tracker.log_metrics`, :meth:`Tracker.log_figure`, ...) only
puts an item on a queue; a daemon thread imports MLflow, opens the run and
sends batches. Training therefore never waits for the store, the network or
figure rendering. If the tracking server cannot be reached, the tracker says so
once, drops further MLflow calls and training goes on (checkpoints never
depend on it). Metrics are also appended to ``<output>/metrics.jsonl`` so a run
can be read without MLflow.

Where the run goes: ``MLFLOW_TRACKING_URI`` when set, else
``tracking.tracking_uri``, else a local SQLite store ``<output>/mlflow.db``
with artifacts in ``<output>/mlartifacts`` (no server; MLflow 3 deprecates the
plain file store). Open it with ``mlflow ui --backend-store-uri sqlite:///<output>/mlflow.db``.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from msgfm.config import TrackingConfig

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 500  # MLflow's limit on a param value (longer ones are clipped, the full text is an artifact)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": value}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def tracking_uri(cfg: TrackingConfig, output_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri or f"sqlite:///{output_dir.resolve()}/mlflow.db"


class Tracker:
    """Asynchronous MLflow run (rank 0) plus a local metrics.jsonl; a no-op elsewhere."""

    def __init__(self, cfg: TrackingConfig, output_dir: Path, active: bool) -> None:
        self.active = active
        self.output_dir = output_dir
        self.uri = tracking_uri(cfg, output_dir)
        self.experiment = cfg.experiment
        self.run_id: str | None = None
        self._mlflow_ok = cfg.enabled
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._metrics_file = None
        if active:
            output_dir.mkdir(parents=True, exist_ok=True)
            self._metrics_file = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")
            self._thread = threading.Thread(target=self._work, name="msgfm-mlflow", daemon=True)
            self._thread.start()

    # -- called from the training loop (cheap) --------------------------------------------

    def open(self, run_name: str, params: dict[str, Any], tags: dict[str, str], artifacts: dict[str, Path],
             resumed: bool) -> None:
        """Open the run and record params, tags and files; a resumed run reopens the run its folder names."""
        if not self.active:
            return
        run_id_file = self.output_dir / "mlflow_run_id"
        run_id = run_id_file.read_text().strip() if resumed and run_id_file.is_file() else None
        self._queue.put(lambda: self._start(run_name, params, tags, artifacts, run_id))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active or self._metrics_file is None:
            return
        self._metrics_file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self._metrics_file.flush()
        if self._mlflow_ok:
            self._queue.put(lambda: self._log_metrics(metrics, step))

    def log_artifact(self, make_file: Callable[[], Path], artifact_path: str) -> None:
        """``make_file`` runs on the tracking thread (render a figure there, not in the loop)."""
        if self.active:
            self._queue.put(lambda: self._log_artifact(make_file, artifact_path))

    def close(self, timeout_s: float = 120.0) -> None:
        """Flush and end the run; gives up after ``timeout_s`` (an unreachable server never blocks exit)."""
        if not self.active or self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            print(f"msgfm: MLflow did not finish within {timeout_s:.0f} s; the rest of its queue is dropped "
                  f"(metrics are in {self.output_dir / 'metrics.jsonl'})", flush=True)
        if self._metrics_file is not None:
            self._metrics_file.close()

    # -- tracking thread ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._finish()
                return
            try:
                item()
            except Exception as err:  # never let tracking take training down
                self._fail(err)

    def _fail(self, err: Exception) -> None:
        if self._mlflow_ok:
            print(f"msgfm: MLflow at {self.uri} failed ({type(err).__name__}: {err}); training continues "
                  f"without it, metrics still go to {self.output_dir / 'metrics.jsonl'}", flush=True)
        self._mlflow_ok = False

    def _start(self, run_name: str, params: dict[str, Any], tags: dict[str, str],
               artifacts: dict[str, Path], resume_run_id: str | None) -> None:
        if not self._mlflow_ok:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        self.client = MlflowClient(tracking_uri=self.uri)
        if resume_run_id:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            location = (self.output_dir / "mlartifacts").resolve().as_uri() if self.uri.startswith("sqlite") else None
            experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=run_name)
        self.run_id = run.info.run_id
        (self.output_dir / "mlflow_run_id").write_text(self.run_id)
        flat = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=flat[i:i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        for artifact_path, path in artifacts.items():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self._mlflow_ok or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k.replace("@", "_"), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def _log_artifact(self, make_file: Callable[[], Path], artifact_path: str) -> None:
        path = make_file()
        if self._mlflow_ok and self.run_id is not None:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def _finish(self) -> None:
        if self._mlflow_ok and self.run_id is not None:
            try:
                self.client.set_terminated(self.run_id)
            except Exception as err:
                self._fail(err)

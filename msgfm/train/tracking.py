"""MLflow tracking on rank 0, off the training thread.

Every call (:meth:`Tracker.log_metrics`, :meth:`Tracker.log_artifact`, ...) only
puts an item on a queue; a daemon thread imports MLflow, opens the run and
sends batches. Training therefore never waits for the store, the network or
figure rendering. If the tracking server cannot be reached (an HTTP server is
probed first, with a few seconds' timeout), the tracker says so in one line,
drops further MLflow calls and training goes on (checkpoints never depend on
it). At exit it waits at most ``tracking.close_timeout_s`` for the thread.
Metrics are also appended to ``<output>/metrics.jsonl`` so a run can be read
without MLflow; ``msgfm track-sync <output>`` replays them (and the figures and
configs) into MLflow later.

Each step is recorded once: on resume, ``metrics.jsonl`` loses the rows after
the resumed step (the resumed run writes them again), and the reopened MLflow
run is not sent the steps it already holds.

Where the run goes: ``MLFLOW_TRACKING_URI`` when set, else
``tracking.tracking_uri``, else a local SQLite store ``<output>/mlflow.db``
with artifacts in ``<output>/mlartifacts`` (no server; MLflow 3 deprecates the
plain file store). In that store of the run folder's own, artifact locations are
relative to the folder: ``mlflow-artifacts:/<experiment>/...``, the URIs MLflow's
server resolves against its ``--artifacts-destination`` (here ``<output>/mlartifacts``,
written directly through MLflow's local artifact repository, no server needed), so a
moved or copied run folder keeps its artifacts. Open it with
``mlflow ui --backend-store-uri sqlite:///<output>/mlflow.db --artifacts-destination <output>/mlartifacts``
(:meth:`Tracker.ui_command`).

Besides params, metrics and files, a run records what it read and what it made: the
shards of each data group or split as MLflow datasets (``log_inputs``: name, a digest of
the files, the folder, a schema of the sensors' arrays, the samples), and a fine-tuning
run its best model as an MLflow logged model (:meth:`Tracker.log_model`) with its config.
A failure there is reported in one line and leaves the rest of the tracking running.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from msgfm.config import TrackingConfig
from msgfm.data.format import ShardInfo

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 500  # MLflow's limit on a param value (longer ones are clipped, the full text is an artifact)
MAX_TAG_LENGTH = 5000  # a tag value is clipped to this (the full record is config_changes.jsonl)
PROBE_TIMEOUT_S = 5.0  # an HTTP tracking server that does not answer /health within this is unreachable
# MLflow's HTTP defaults (7 retries, 120 s timeout each) turn a server lost mid-run into minutes per call;
# these apply unless the user set them (environment variables of the same names)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


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
    """Where the run goes: MLFLOW_TRACKING_URI, else tracking.tracking_uri, else the run folder's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri or run_folder_store(output_dir)


def run_folder_store(output_dir: Path) -> str:
    """The SQLite store of the run folder's own: ``<output>/mlflow.db``."""
    return f"sqlite:///{output_dir.resolve()}/mlflow.db"


ARTIFACTS_DIR = "mlartifacts"  # in the run folder: what MLflow's server calls the artifacts destination
RELATIVE_SCHEME = "mlflow-artifacts"


def experiment_artifact_location(uri: str, output_dir: Path, experiment: str) -> str | None:
    """Where a new experiment keeps artifacts: in the run folder's own store a location relative to
    ``<output>/mlartifacts`` (see the module docstring); in another SQLite store the run folder's
    ``mlartifacts`` (absolute); a server decides for itself (None)."""
    if uri == run_folder_store(output_dir):
        return f"{RELATIVE_SCHEME}:/{re.sub(r'[^A-Za-z0-9_.-]', '_', experiment)}"
    if uri.startswith("sqlite"):
        return (output_dir / ARTIFACTS_DIR).resolve().as_uri()
    return None


def local_artifact_dir(output_dir: Path, artifact_uri: str) -> Path | None:
    """The folder under ``<output>/mlartifacts`` of a relative (``mlflow-artifacts:/...``) artifact location of
    a run or a logged model; None for any other location (MLflow resolves those itself)."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme != RELATIVE_SCHEME:
        return None
    return output_dir / ARTIFACTS_DIR / parsed.path.lstrip("/")


def artifact_repository(output_dir: Path, artifact_uri: str) -> Any:
    """MLflow's artifact repository of a run's or logged model's location, relative locations resolved in the
    run folder ``output_dir`` (wherever it lies now)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    local = local_artifact_dir(output_dir, artifact_uri)
    return get_artifact_repository(artifact_uri) if local is None else LocalArtifactRepository(str(local))


def run_artifacts(client: Any, output_dir: Path, run_id: str) -> Any:
    """The artifact repository of an MLflow run of the run folder ``output_dir``."""
    return artifact_repository(output_dir, client.get_run(run_id).info.artifact_uri)


@dataclass(frozen=True, kw_only=True)
class ShardSet:
    """The shards a run read for one data group or split, logged as one MLflow dataset."""

    name: str  # the data group (pretraining) or the task and split (fine-tuning)
    context: str  # MLflow's dataset context: training / validation / test
    shards: tuple[ShardInfo, ...]


def shard_dataset_input(shard_set: ShardSet) -> Any:
    """An MLflow ``DatasetInput`` for a set of shards: the shards' folder as its source, a digest of the files
    (names, sizes, modification times: a changed shard makes a new dataset version), the sensors' arrays
    as its schema, and the sample and shard counts as input tags."""
    import numpy as np
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec

    paths = [info.path.resolve() for info in shard_set.shards]
    folder = Path(os.path.commonpath([str(p.parent) for p in paths]))
    digest = hashlib.sha256()
    for path in sorted(paths):
        st = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    first = shard_set.shards[0]
    schema = Schema([TensorSpec(np.dtype(s.dtype), (-1, *s.shape[1:]), name) for name, s in first.sensors.items()])
    # MLflow registers its local-folder source twice (paths and file: URIs): name one, or it warns per dataset
    local = [c for c in get_registered_sources() if getattr(c, "__name__", "") == "LocalArtifactDatasetSource"][:1]
    source = resolve_dataset_source(folder.as_uri(), candidate_sources=local or None)
    dataset = MetaDataset(source=source, name=shard_set.name,  # type: ignore[abstract]  # runs: MetaDataset has a profile
                          digest=digest.hexdigest()[:16], schema=schema)
    samples = sum(info.num_samples for info in shard_set.shards)
    tags = [InputTag("mlflow.data.context", shard_set.context), InputTag("msgfm.samples", str(samples)),
            InputTag("msgfm.shards", str(len(paths)))]
    return DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags)


def is_http(uri: str) -> bool:
    """A tracking server (as opposed to a local store)."""
    return uri.startswith(("http://", "https://"))


def probe_server(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the HTTP tracking server at ``uri`` answers at all (any status), else why not."""
    import ssl
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError:  # it answered (authentication, a proxy, an old server): reachable
        return None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, ssl.SSLError):  # it answered; MLflow has its own certificate settings
            return None
        return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (a kill mid-write) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows of ``path`` up to ``step`` (a resume writes the later ones again); returns how many went."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = read_metrics(path)
    kept = [row for row in rows if row["step"] <= step]
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines) - len(kept)


def logged_steps(client: Any, run_id: str) -> dict[str, int]:
    """The last step MLflow holds for each metric of a run."""
    run = client.get_run(run_id)
    return {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
            for key in run.data.metrics}


def metric_name(key: str) -> str:
    """An msgfm metric key as MLflow accepts it."""
    return key.replace("@", "_")


def create_run(client: Any, uri: str, output_dir: Path, experiment: str, run_name: str, params: dict[str, Any],
               tags: dict[str, str], artifacts: dict[str, Path]) -> str:
    """A new MLflow run for the run folder ``output_dir`` (its id also goes to ``mlflow_run_id``)."""
    from mlflow.entities import Param, RunTag

    found = client.get_experiment_by_name(experiment)
    if found is None:
        experiment_id = client.create_experiment(
            experiment, artifact_location=experiment_artifact_location(uri, output_dir, experiment))
    else:
        experiment_id = found.experiment_id
    run = client.create_run(experiment_id, run_name=run_name)
    run_id: str = run.info.run_id
    (output_dir / "mlflow_run_id").write_text(run_id)
    flat = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(params).items()]
    for i in range(0, len(flat), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=flat[i:i + 100])
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    repository = artifact_repository(output_dir, run.info.artifact_uri)
    for artifact_path, path in artifacts.items():
        repository.log_artifact(str(path), artifact_path)
    return run_id


class Tracker:
    """Asynchronous MLflow run (rank 0) plus a local metrics.jsonl; a no-op elsewhere."""

    def __init__(self, cfg: TrackingConfig, output_dir: Path, active: bool) -> None:
        self.active = active
        self.output_dir = output_dir
        self.uri = tracking_uri(cfg, output_dir)
        self.experiment = cfg.experiment
        self.close_timeout_s = cfg.close_timeout_s
        self.run_id: str | None = None
        self.client: Any = None
        self._artifacts: Any = None  # the run's artifact repository
        self._mlflow_ok = cfg.enabled
        self._logged_upto: dict[str, int] = {}  # per MLflow metric: the last step the reopened run holds
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._metrics_path = output_dir / "metrics.jsonl"
        self._metrics_file: IO[str] | None = None
        if active:
            output_dir.mkdir(parents=True, exist_ok=True)
            if is_http(self.uri):
                for name, value in HTTP_DEFAULTS.items():
                    os.environ.setdefault(name, value)
            self._metrics_file = open(self._metrics_path, "a", encoding="utf-8")
            self._thread = threading.Thread(target=self._work, name="msgfm-mlflow", daemon=True)
            self._thread.start()

    # -- called from the training loop (cheap) --------------------------------------------

    def ui_command(self) -> str:
        """How to look at the run: the MLflow UI on its store (and the run folder's artifacts)."""
        if is_http(self.uri):
            return self.uri
        return (f"mlflow ui --backend-store-uri {self.uri} --artifacts-destination "
                f"{self.output_dir.resolve() / ARTIFACTS_DIR}")

    def open(self, run_name: str, params: dict[str, Any], tags: dict[str, str], artifacts: dict[str, Path],
             resumed: bool, resume_step: int = 0, datasets: Sequence[ShardSet] = ()) -> None:
        """Open the run and record params, tags, files and the shards it reads (``datasets``); a resumed run
        reopens the run its folder names.

        ``resume_step``: the step training goes on from (0 for a fresh start in a folder that may hold
        rows of a run killed before its first checkpoint); metrics.jsonl rows after it are dropped, since
        the run logs those steps again, and the reopened MLflow run is not sent steps it already holds.
        """
        if not self.active:
            return
        run_id_file = self.output_dir / "mlflow_run_id"
        run_id = run_id_file.read_text().strip() if resumed and run_id_file.is_file() else None
        if self._metrics_file is not None:
            self._metrics_file.close()
            truncate_metrics(self._metrics_path, resume_step)
            self._metrics_file = open(self._metrics_path, "a", encoding="utf-8")
        self._queue.put(lambda: self._start(run_name, params, tags, artifacts, run_id, resume_step))
        if datasets and self._mlflow_ok:
            self._queue.put(lambda: self._optional("log the datasets", lambda: self._log_datasets(datasets)))

    def log_model(self, name: str, files: Sequence[tuple[str, Path]], params: dict[str, Any], model_type: str,
                  step: int) -> None:
        """Record a model as an MLflow logged model of this run: ``files`` ((artifact folder, "" for the top;
        file), e.g. weights and config), ``params`` (flattened) and the run's step; the files are read on the
        tracking thread."""
        if self.active and self._mlflow_ok:
            self._queue.put(lambda: self._optional(
                f"log the model '{name}'", lambda: self._log_model(name, files, params, model_type, step)))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Append one row to metrics.jsonl and queue it for MLflow."""
        if not self.active or self._metrics_file is None:
            return
        self._metrics_file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self._metrics_file.flush()
        if self._mlflow_ok:
            self._queue.put(lambda: self._log_metrics(metrics, step))

    def log_config_change(self, step: int, changes: list[dict[str, Any]], files: list[Path]) -> None:
        """A resume that changed the config (``changes``: rows of key, old, new, kind): a tag naming them at
        ``step``, a param per changed key (``changed.stepN.<key>``: MLflow never changes a logged param),
        the metric ``config/changes`` at ``step`` (a mark on the curves), and ``files`` logged under ``config/``."""
        if not self.active:
            return
        self._queue.put(lambda: self._log_config_change(step, changes, files))

    def log_artifact(self, make_file: Callable[[], Path], artifact_path: str) -> None:
        """``make_file`` runs on the tracking thread (render a figure there, not in the loop)."""
        if self.active:
            self._queue.put(lambda: self._log_artifact(make_file, artifact_path))

    def close(self, timeout_s: float | None = None) -> None:
        """Flush and end the run; waits at most ``timeout_s`` (default ``tracking.close_timeout_s``) for MLflow,
        so an unreachable or slow server never holds up the exit. What is still queued then is not sent, but
        its local part (rendering figures into the run folder) is done here, for ``msgfm track-sync``."""
        if not self.active or self._thread is None:
            return
        timeout_s = self.close_timeout_s if timeout_s is None else timeout_s
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            was_sending = self._mlflow_ok
            self._mlflow_ok = False  # from now on the queued items skip MLflow
            unsent = self._drain_locally()
            if was_sending:
                print(f"msgfm: MLflow at {self.uri} did not finish within {timeout_s:g} s (tracking.close_timeout_s);"
                      f" {unsent} queued item(s) not sent; metrics are in {self._metrics_path}, replay them with "
                      f"`msgfm track-sync {self.output_dir}`", flush=True)
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None

    def _drain_locally(self) -> int:
        """Run what is left in the queue on this thread (MLflow calls are off by now); returns how many."""
        done = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                continue
            done += 1
            try:
                item()
            except Exception:  # a figure that fails to render must not fail the exit
                log.debug("tracking item failed at exit", exc_info=True)
        self._queue.put(None)  # let the thread end if it ever comes back
        return done

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

    def _fail(self, err: Exception | str) -> None:
        if self._mlflow_ok:
            first_line = (str(err).splitlines() or [""])[0]
            why = err if isinstance(err, str) else f"failed ({type(err).__name__}: {first_line})"
            print(f"msgfm: MLflow at {self.uri} {why}; training continues without it, metrics still go to "
                  f"{self._metrics_path}; replay them later with `msgfm track-sync {self.output_dir}`", flush=True)
        self._mlflow_ok = False

    def _start(self, run_name: str, params: dict[str, Any], tags: dict[str, str],
               artifacts: dict[str, Path], resume_run_id: str | None, resume_step: int = 0) -> None:
        if not self._mlflow_ok:
            return
        if is_http(self.uri) and (why := probe_server(self.uri)) is not None:
            self._fail(f"is unreachable ({why})")
            return
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.client = MlflowClient(tracking_uri=self.uri)
        if resume_run_id:
            try:
                self._logged_upto = logged_steps(self.client, resume_run_id)
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                print(f"msgfm: MLflow run {resume_run_id} is not in {self.uri}; starting a new MLflow run "
                      f"for this run folder", flush=True)
            else:
                self.run_id = resume_run_id
                self.client.update_run(resume_run_id, status="RUNNING")
                self._send_unsent_rows(resume_step)
                return
        self.run_id = create_run(self.client, self.uri, self.output_dir, self.experiment, run_name, params, tags,
                                 artifacts)

    def _send_unsent_rows(self, resume_step: int) -> None:
        """A resumed run: the rows of metrics.jsonl up to the resumed step that the reopened MLflow run never
        received, e.g. the last steps before a kill, which the tracking thread had not sent yet. The run logs
        only the steps after ``resume_step`` again (those are queued as they come), so without this MLflow
        would miss them for good."""
        for row in read_metrics(self._metrics_path):
            values = {k: v for k, v in row.items() if k not in ("step", "time") and isinstance(v, (int, float))}
            if values and row["step"] <= resume_step:
                self._log_metrics(values, row["step"])

    def _optional(self, what: str, action: Callable[[], None]) -> None:
        """A record the run can do without (datasets, models): a failure is one line, metrics go on."""
        if not self._mlflow_ok or self.run_id is None:
            return
        try:
            action()
        except Exception as err:
            first_line = (str(err).splitlines() or [""])[0]
            print(f"msgfm: MLflow at {self.uri}: could not {what} ({type(err).__name__}: {first_line}); "
                  f"tracking goes on", flush=True)

    def _log_datasets(self, datasets: Sequence[ShardSet]) -> None:
        assert self.run_id is not None
        self.client.log_inputs(self.run_id, datasets=[shard_dataset_input(d) for d in datasets if d.shards])

    def _log_model(self, name: str, files: Sequence[tuple[str, Path]], params: dict[str, Any], model_type: str,
                   step: int) -> None:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        assert self.run_id is not None
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        flat = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(params).items()}
        model = self.client.create_logged_model(experiment_id, name=name, source_run_id=self.run_id, params=flat,
                                                model_type=model_type)
        try:
            repository = artifact_repository(self.output_dir, model.artifact_location)
            for folder, path in files:
                repository.log_artifact(str(path), folder or None)
        except Exception:
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model_id=model.model_id, step=step)])

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self._mlflow_ok or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()
                 if step > self._logged_upto.get(metric_name(k), -1)]  # a resumed run may hold it already
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def _log_config_change(self, step: int, changes: list[dict[str, Any]], files: list[Path]) -> None:
        if not self._mlflow_ok or self.run_id is None:
            return
        from mlflow.entities import Metric, Param, RunTag

        summary = "; ".join(f"{c['key']}: {c['old']} -> {c['new']}" for c in changes)
        tag = RunTag(f"config_change.step{step:08d}", summary[:MAX_TAG_LENGTH])
        params = [Param(f"changed.step{step}.{c['key']}", str(c["new"])[:MAX_PARAM_LENGTH]) for c in changes]
        metric = Metric("config/changes", float(len(changes)), int(time.time() * 1000), step)
        self.client.log_batch(self.run_id, params=params[:100], tags=[tag], metrics=[metric])
        for i in range(100, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        for path in files:
            self._upload(path, "config")

    def _log_artifact(self, make_file: Callable[[], Path], artifact_path: str) -> None:
        path = make_file()
        if self._mlflow_ok and self.run_id is not None:
            self._upload(path, artifact_path)

    def _upload(self, path: Path, artifact_path: str) -> None:
        """Every artifact goes through the run's repository (``run_artifacts``): the run folder's own store keeps
        locations relative to the folder, which MLflow's client alone cannot write to."""
        assert self.run_id is not None
        if self._artifacts is None:
            self._artifacts = run_artifacts(self.client, self.output_dir, self.run_id)
        self._artifacts.log_artifact(str(path), artifact_path)

    def _finish(self) -> None:
        if self._mlflow_ok and self.run_id is not None:
            try:
                self.client.set_terminated(self.run_id)
            except Exception as err:
                self._fail(err)

"""What MLflow shows of a run's lineage: the shards it read as MLflow datasets, the model it made as a logged
model, and artifact locations relative to the run folder, so a moved run folder keeps its artifacts (checked
with MLflow's own server-side artifact handler, which serves them from the moved folder)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train_support import REPO, child_env, write_tiny_run

from msgfm.config import TrackingConfig, load_config
from msgfm.data.format import read_shard_info
from msgfm.data.plan import plan_data
from msgfm.data.synthetic import random_arrays, write_shard
from msgfm.train.ds_config import load_ds_config
from msgfm.train.pretrain import build_trainer, start_tracking
from msgfm.train.tracking import ShardSet, Tracker, artifact_repository, run_artifacts

# MLflow's tracking server resolves mlflow-artifacts:/... against --artifacts-destination with this handler;
# run in a child process (the handler caches its repository in a module global)
SERVER_LIST = """
import json, os, sys
os.environ["_MLFLOW_SERVER_ARTIFACT_DESTINATION"] = sys.argv[1]
os.environ["_MLFLOW_SERVER_SERVE_ARTIFACTS"] = "true"
os.environ["_MLFLOW_SERVER_FILE_STORE"] = sys.argv[2]
from mlflow.server import app
client = app.test_client()
listing = client.get("/api/2.0/mlflow-artifacts/artifacts", query_string={"path": sys.argv[3]}).get_json()
content = client.get("/api/2.0/mlflow-artifacts/artifacts/" + sys.argv[3] + "/" + sys.argv[4]).data.decode()
print(json.dumps({"files": [f["path"] for f in listing.get("files", [])], "content": content}))
"""


@pytest.fixture
def shards(tmp_path) -> list[Path]:
    data = tmp_path / "data" / "sen12ms"
    data.mkdir(parents=True)
    return [write_shard(data / f"sen12ms-{i:05d}.h5", "sen12ms", random_arrays(["sar", "s2"], 3, 16, seed=i))
            for i in range(2)]


@pytest.mark.slow  # ~25 s: MLflow's server app is imported in a child process
def test_a_moved_run_folder_keeps_its_artifacts_datasets_and_model(tmp_path, shards, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "runs" / "ft"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: ft\n")
    (run / "weights.pt").write_bytes(b"weights")
    tracker = Tracker(TrackingConfig(experiment="lineage test"), run, active=True)
    shard_set = ShardSet(name="sen12ms", context="training", shards=tuple(read_shard_info(p) for p in shards))
    tracker.open("ft-run", {"config": {"name": "ft"}}, {}, {"config": run / "config.yaml"}, resumed=False,
                 datasets=[shard_set])
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.log_artifact(lambda: run / "weights.pt", "best")
    tracker.log_model("ft", [("", run / "config.yaml"), ("best", run / "weights.pt")],
                      params={"config": {"name": "ft", "lr": 0.1}}, model_type="msgfm-finetuned", step=1)
    tracker.close(60)
    run_id = (run / "mlflow_run_id").read_text()

    moved = tmp_path / "archive" / "ft_moved"
    shutil.move(str(run), moved)
    assert str(run).encode() not in (moved / "mlflow.db").read_bytes()  # nothing in the store names the old place
    client = MlflowClient(f"sqlite:///{moved}/mlflow.db")
    info = client.get_run(run_id).info
    assert info.artifact_uri.startswith("mlflow-artifacts:/lineage_test/")
    artifacts = run_artifacts(client, moved, run_id)
    assert [a.path for a in artifacts.list_artifacts("best")] == ["best/weights.pt"]
    assert Path(artifacts.download_artifacts("config/config.yaml", str(tmp_path))).read_text() == "name: ft\n"

    # the MLflow UI's server, started on the moved folder, serves the same files
    relative = info.artifact_uri.split(":/", 1)[1] + "/best"
    proc = subprocess.run([sys.executable, "-c", SERVER_LIST, str(moved / "mlartifacts"), f"sqlite:///{moved}/mlflow.db",
                           relative, "weights.pt"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=child_env(drop_prefixes=("MLFLOW_",)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    assert served == {"files": ["weights.pt"], "content": "weights"}

    # the shards as a dataset of the run: digest of the files, schema of the sensors, counts as tags
    (dataset_input,) = client.get_run(run_id).inputs.dataset_inputs
    dataset, tags = dataset_input.dataset, {t.key: t.value for t in dataset_input.tags}
    assert dataset.name == "sen12ms" and len(dataset.digest) == 16 and dataset.source_type == "local"
    assert json.loads(dataset.source)["uri"] == shards[0].parent.resolve().as_uri()
    columns = json.loads(dataset.schema)["mlflow_colspec"]
    assert [(c["name"], c["tensor-spec"]["shape"]) for c in columns] == [("sar", [-1, 2, 16, 16]),
                                                                      ("s2", [-1, 12, 16, 16])]
    assert tags == {"mlflow.data.context": "training", "msgfm.samples": "6", "msgfm.shards": "2"}

    # the model: a logged model of the run with its config as params and its files, also after the move
    (model,) = client.search_logged_models([info.experiment_id])
    assert model.name == "ft" and model.source_run_id == run_id and str(model.status) == "READY"
    assert model.params == {"config.name": "ft", "config.lr": "0.1"} and model.model_type == "msgfm-finetuned"
    files = artifact_repository(moved, model.artifact_location)
    assert sorted(a.path for a in files.list_artifacts()) == ["best", "config.yaml"]
    assert Path(files.download_artifacts("best/weights.pt", str(tmp_path))).read_bytes() == b"weights"
    outputs = client.get_run(run_id).outputs
    assert [o.model_id for o in outputs.model_outputs] == [model.model_id]


def test_a_changed_shard_is_a_new_dataset_version(tmp_path, shards):
    from msgfm.train.tracking import shard_dataset_input

    def digest() -> str:
        shard_set = ShardSet(name="g", context="training", shards=tuple(read_shard_info(p) for p in shards))
        return shard_dataset_input(shard_set).dataset.digest

    before = digest()
    assert digest() == before
    write_shard(shards[1], "sen12ms", random_arrays(["sar", "s2"], 4, 16, seed=9))
    assert digest() != before


def test_a_dataset_that_fails_to_log_is_one_line_and_tracking_goes_on(tmp_path, shards, monkeypatch, capsys):
    from mlflow import MlflowClient

    import msgfm.train.tracking as tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def broken(shard_set: ShardSet) -> None:
        raise OSError("shard folder went away")

    monkeypatch.setattr(tracking, "shard_dataset_input", broken)
    tracker = Tracker(TrackingConfig(), tmp_path, active=True)
    tracker.open("r", {}, {}, {}, resumed=False,
                 datasets=[ShardSet(name="g", context="training", shards=(read_shard_info(shards[0]),))])
    tracker.log_metrics({"train/loss": 2.0}, 1)
    tracker.close(60)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("msgfm: MLflow")]
    assert len(lines) == 1 and "could not log the datasets (OSError: shard folder went away)" in lines[0]
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(
        (tmp_path / "mlflow_run_id").read_text(), "train/loss")
    assert [m.value for m in history] == [2.0]


def test_pretraining_logs_each_groups_shards(tmp_path, single_rank_dist, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tiny = write_tiny_run(tmp_path, samples_per_group=12)
    cfg = load_config(tiny / "tiny.yaml", ["model.moe.expert_parallel_size=1", "train.max_steps=1"])
    plan = plan_data(cfg, tiny / "data")
    trainer = build_trainer(cfg, load_ds_config(tiny / "ds_tiny.json"), plan, tmp_path / "run")
    start_tracking(trainer, cfg, plan, resumed=False)
    trainer.tracker.close(60)
    client = MlflowClient(f"sqlite:///{tmp_path / 'run'}/mlflow.db")
    inputs = client.get_run((tmp_path / "run" / "mlflow_run_id").read_text()).inputs.dataset_inputs
    by_name = {i.dataset.name: {t.key: t.value for t in i.tags} for i in inputs}
    assert list(by_name) == [g.name for g in cfg.data.groups]
    for name, summary in plan.summaries.items():
        assert by_name[name]["msgfm.samples"] == str(summary.num_samples)
        assert by_name[name]["mlflow.data.context"] == "training"
    assert np.all([i.dataset.source_type == "local" for i in inputs])

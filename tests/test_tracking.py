"""MLflow tracking: an unreachable server never stops training, and says so once."""
from __future__ import annotations

import json

from msgfm.config import TrackingConfig
from msgfm.train.tracking import Tracker, flatten, tracking_uri


def test_unreachable_server_is_reported_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(TrackingConfig(tracking_uri="http://127.0.0.1:9"), tmp_path, active=True)
    tracker.open("r", {"a": {"b": 1}}, {"t": "x"}, {}, resumed=False)
    for step in range(3):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    tracker.close(timeout_s=60)
    out = capsys.readouterr().out
    assert out.count("msgfm: MLflow at") == 1 and "training continues" in out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]


def test_default_store_is_local_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert tracking_uri(TrackingConfig(tracking_uri="http://other"), tmp_path) == "http://server:5000"


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}

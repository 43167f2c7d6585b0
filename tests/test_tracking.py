"""MLflow tracking: an outage costs nothing (one line, a bounded exit, a replay later), each step is logged once.

The dead servers are real sockets: a port with nothing listening (connection refused) and a socket
that accepts and never answers (the worse case: every request waits for its timeout). Exit times are
bounded by subprocess timeouts that an unbounded wait would overrun, never asserted as numbers.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_train_support import REPO, child_env

from msgfm.config import TrackingConfig
from msgfm.train.tracking import Tracker, flatten, probe_server, read_metrics, tracking_uri, truncate_metrics

TRACKER_SCRIPT = """
import sys
from pathlib import Path
from msgfm.config import TrackingConfig
from msgfm.train.tracking import Tracker

tracker = Tracker(TrackingConfig(tracking_uri=sys.argv[1]), Path(sys.argv[2]), active=True)
tracker.open("run", {"a": {"b": 1}}, {"t": "x"}, {}, resumed=False)
for step in range(1, 4):
    tracker.log_metrics({"train/loss": 1.0 / step}, step)
tracker.close()
print("closed", flush=True)
"""


@contextmanager
def silent_server() -> Iterator[str]:
    """An HTTP URI whose socket accepts connections (the kernel does) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def refused_uri() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed again: nothing listens there


@pytest.mark.parametrize("server", ["silent", "refused"])
def test_dead_server_is_one_line_and_a_bounded_exit(tmp_path, server):
    """As a real process: MLflow's defaults (7 retries of 120 s) would hold the exit for minutes."""
    with silent_server() as silent:
        uri = silent if server == "silent" else refused_uri()
        proc = subprocess.run([sys.executable, "-c", TRACKER_SCRIPT, uri, str(tmp_path)], cwd=REPO,
                              capture_output=True, text=True, timeout=90, env=child_env(drop_prefixes=("MLFLOW_",)))
    assert proc.returncode == 0 and "closed" in proc.stdout, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("msgfm: MLflow")]
    assert len(lines) == 1 and f"{uri} is unreachable" in lines[0], proc.stdout
    assert f"msgfm track-sync {tmp_path}" in lines[0] and "Traceback" not in proc.stdout + proc.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_probe_counts_any_answer_as_reachable():
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Forbidden(BaseHTTPRequestHandler):  # a proxy or an authenticating server
        def do_GET(self) -> None:
            self.send_response(403)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert probe_server(f"http://127.0.0.1:{server.server_port}") is None
    finally:
        server.shutdown()
    assert "ConnectionRefusedError" in probe_server(refused_uri())
    with silent_server() as uri:
        assert "timed out" in probe_server(uri, timeout_s=0.5)


def test_close_waits_at_most_its_timeout_and_still_writes_figures(tmp_path, capsys):
    release = threading.Event()
    tracker = Tracker(TrackingConfig(close_timeout_s=0.2), tmp_path, active=True)
    tracker._log_metrics = lambda metrics, step: release.wait(60)  # a server that stops answering mid-run
    tracker.log_metrics({"train/loss": 1.0}, 1)
    figure = tmp_path / "figures" / "recon.png"

    def render() -> Path:
        figure.parent.mkdir()
        figure.write_bytes(b"png")
        return figure

    tracker.log_artifact(render, "figures")
    tracker.close()  # returns after 0.2 s instead of waiting for the server
    release.set()
    assert figure.is_file()  # rendered for the run folder (and track-sync) even though nothing was sent
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "did not finish within 0.2 s (tracking.close_timeout_s)" in out
    assert "1 queued item(s) not sent" in out


def test_resume_writes_each_step_once(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = Tracker(TrackingConfig(), tmp_path, active=True)
    first.open("run", {"a": 1}, {}, {}, resumed=False, resume_step=0)
    for step in range(1, 6):  # checkpoint at step 3, killed after step 5
        first.log_metrics({"train/loss": float(step)}, step)
    first.close(60)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # the kill tore the last line
    run_id = (tmp_path / "mlflow_run_id").read_text()
    resumed = Tracker(TrackingConfig(), tmp_path, active=True)
    resumed.open("run", {"a": 1}, {}, {}, resumed=True, resume_step=3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    for step in range(4, 8):
        resumed.log_metrics({"train/loss": 10.0 * step}, step)
    resumed.close(60)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 8)) and rows[4]["train/loss"] == 50.0
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(run_id, "train/loss")
    steps = sorted(m.step for m in history)
    assert steps == list(range(1, 8))  # 4 and 5 were not sent again
    assert {m.step: m.value for m in history}[5] == 5.0 and {m.step: m.value for m in history}[6] == 60.0


def test_resume_sends_the_checkpointed_steps_mlflow_never_got(tmp_path, monkeypatch):
    """Killed after step 3's checkpoint with step 3 written to metrics.jsonl but not yet sent by the tracking
    thread: the resumed run (which logs only steps 4 on) sends step 3 from metrics.jsonl, once."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = Tracker(TrackingConfig(), tmp_path, active=True)
    first.open("run", {"a": 1}, {}, {}, resumed=False, resume_step=0)
    for step in (1, 2):
        first.log_metrics({"train/loss": float(step), "lr/rgb": 0.1}, step)
    first.close(60)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # step 3: on disk, never sent
        f.write(json.dumps({"step": 3, "time": 0.0, "train/loss": 3.0, "lr/rgb": 0.1}) + "\n")
    run_id = (tmp_path / "mlflow_run_id").read_text()
    resumed = Tracker(TrackingConfig(), tmp_path, active=True)
    resumed.open("run", {"a": 1}, {}, {}, resumed=True, resume_step=3)
    for step in (4, 5):
        resumed.log_metrics({"train/loss": float(step), "lr/rgb": 0.1}, step)
    resumed.close(60)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for name in ("train/loss", "lr/rgb"):
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == [1, 2, 3, 4, 5], name
    assert {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}[3] == 3.0


def test_truncate_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "x"')
    assert truncate_metrics(path, 2) == 2 and [r["step"] for r in read_metrics(path)] == [1, 2]
    assert truncate_metrics(path, 5) == 0 and truncate_metrics(tmp_path / "none.jsonl", 0) == 0


def test_track_sync_replays_once(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient
    from PIL import Image

    from msgfm.cli import main as msgfm_main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    (run / "figures").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(run / "figures" / "recon_rgb_step00000002.png")
    (run / "config.yaml").write_text("name: demo\ntracking:\n  experiment: replayed\n")
    rows = [{"step": s, "time": 1700000000.0 + s, "train/loss": 1.0 / s, "lr/rgb@0": 0.1} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = f"sqlite:///{tmp_path}/server.db"
    assert msgfm_main(["track-sync", str(run), "--tracking-uri", store]) == 0
    assert "6 metric values sent (0 already there), 2 files sent; new MLflow run" in capsys.readouterr().out
    client = MlflowClient(store)
    run_id = (run / "mlflow_run_id").read_text()
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3]
    assert client.get_run(run_id).data.params["config.name"] == "demo"
    assert client.get_experiment(client.get_run(run_id).info.experiment_id).name == "replayed"
    assert [a.path for a in client.list_artifacts(run_id, "figures")] == ["figures/recon_rgb_step00000002.png"]
    # more steps arrived in the folder: a second sync sends those only
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "time": 1.0, "train/loss": 0.25}) + "\n")
    assert msgfm_main(["track-sync", str(run), "--tracking-uri", store]) == 0
    assert "1 metric values sent (6 already there), 0 files sent; MLflow run" in capsys.readouterr().out
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3, 4]


def test_track_sync_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from msgfm.cli import main as msgfm_main
    from msgfm.train.tracking import HTTP_DEFAULTS

    for name in HTTP_DEFAULTS:  # the sync sets them in this process: undone after the test
        monkeypatch.delenv(name, raising=False)

    assert msgfm_main(["track-sync", str(tmp_path)]) == 2
    assert "not an msgfm run folder" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert msgfm_main(["track-sync", str(tmp_path), "--tracking-uri", refused_uri()]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is unreachable" in err and "nothing was sent" in err


def test_default_store_is_local_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert tracking_uri(TrackingConfig(tracking_uri="http://other"), tmp_path) == "http://server:5000"


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


@pytest.mark.slow
def test_pretraining_with_a_dead_server_then_track_sync(tmp_path, monkeypatch):
    """The whole story as a user lives it: the server is down, training runs and exits promptly, the
    metrics, figures and configs reach MLflow later with `msgfm track-sync`."""
    import time

    from mlflow import MlflowClient
    from test_train_support import child_env, write_tiny_run

    folder = write_tiny_run(tmp_path, samples_per_group=12)
    out = tmp_path / "run"
    env = child_env(drop_prefixes=("MLFLOW_",))
    with silent_server() as uri:
        cmd = [sys.executable, "launchers/pretrain.py", "--deepspeed_config", str(folder / "ds_tiny.json"),
               "--config", str(folder / "tiny.yaml"), "--output-dir", str(out), "train.max_steps=2",
               "model.moe.expert_parallel_size=1", "tracking.figure_interval=1",
               "data.epoch=largest_group_once"]  # every group in both steps, so each draws both figures
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**env, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"})
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 600
        while not any("step 2: checkpoint" in line for line in lines) and proc.poll() is None:
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.5)
        # training is over: what is left is closing tracking and exiting (bounded by tracking.close_timeout_s=10;
        # the unbounded wait this replaces took ~118 s)
        proc.wait(timeout=30)
        reader.join(10)
    log = "".join(lines)
    assert proc.returncode == 0, log[-3000:]
    assert "Traceback" not in log and "Done." in log
    assert sum(line.startswith("msgfm: MLflow at") for line in lines) == 1 and f"{uri} is unreachable" in log, log
    store = f"sqlite:///{tmp_path}/later.db"
    sync = subprocess.run([sys.executable, "-m", "msgfm.cli", "track-sync", str(out), "--tracking-uri", store],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert sync.returncode == 0 and "Traceback" not in sync.stdout + sync.stderr, sync.stdout + sync.stderr
    client = MlflowClient(store)
    run_id = (out / "mlflow_run_id").read_text()
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2]
    figures = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert {f"figures/recon_{g}_step0000000{s}.png" for g in ("rgb", "sen12ms", "mdas") for s in (1, 2)} <= figures
    assert "config/config.yaml" in {a.path for a in client.list_artifacts(run_id, "config")}
    assert client.get_run(run_id).data.params["config.name"] == "tiny"

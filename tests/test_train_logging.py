"""What the trainer logs: each logging interval reports the mean over its own steps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train_support import write_tiny_run

from msgfm.config import load_config
from msgfm.data.plan import plan_data
from msgfm.train.ds_config import load_ds_config
from msgfm.train.pretrain import build_trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("logging"), samples_per_group=12)


def logged(tiny: Path, out: Path, *overrides: str) -> dict[int, dict[str, float]]:
    cfg = load_config(tiny / "tiny.yaml", ["model.moe.expert_parallel_size=1", "train.max_steps=4",
                                           "train.checkpoint_interval=100", "train.mode=per_group",
                                           "data.epoch=largest_group_once", *overrides])
    trainer = build_trainer(cfg, load_ds_config(tiny / "ds_tiny.json"), plan_data(cfg, tiny / "data"), out)
    trainer.fit()
    trainer.tracker.close()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


@pytest.mark.slow
def test_tracking_interval_means_its_own_steps_when_the_console_logs_more_often(tiny, single_rank_dist, tmp_path):
    every_step = logged(tiny, tmp_path / "a", "train.log_interval=1", "tracking.log_interval=1")
    every_other = logged(tiny, tmp_path / "b", "train.log_interval=1", "tracking.log_interval=2")
    assert sorted(every_step) == [1, 2, 3, 4] and sorted(every_other) == [2, 4]
    for step in (2, 4):
        for key in ("train/loss", "train/rgb/loss", "lr/rgb"):
            mean = (every_step[step - 1][key] + every_step[step][key]) / 2
            assert every_other[step][key] == pytest.approx(mean, rel=1e-6), (step, key)
    assert every_other[2]["train/loss"] != pytest.approx(every_step[2]["train/loss"], rel=1e-6)


def test_console_line_marks_a_group_without_steps_in_the_interval(tmp_path, capsys):
    """With every group once per epoch a group may not be due in a console interval: it shows '-', not nan."""
    from msgfm.train.metrics import StepObserver

    class NoTracker:
        def log_metrics(self, values, step):
            pass

    observer = StepObserver(None, NoTracker(), tmp_path, 0, log_interval=5, tracking_interval=5, figure_interval=None,
                            groups=["rgb", "sen12ms"])
    observer._print(5, 60, {"train/loss": 0.9, "train/rgb/loss": 0.9, "epoch": 0.4,
                            "throughput/samples_per_s": 10.0, "time/data_wait_fraction": 0.0})
    line = capsys.readouterr().out
    assert "(rgb=0.9000 sen12ms=-)" in line and "nan" not in line

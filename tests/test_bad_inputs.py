"""Bad inputs through the real entry points (issue 14, point 7): each case runs as a process
(``python launchers/pretrain.py``, ``python launchers/finetune.py``, ``python -m msgfm.cli``, which is
what the ``msgfm`` script runs) and must end with a non-zero exit, no traceback, and an error line
that names the file, key, option or sensor. The good input beside them runs too, once per entry point.

Representative cases, one per kind (each child costs ~4 s of torch import on the test machine);
docs/reliability.md lists them with what each gets. A pretraining child is stopped as soon as its
error is printed, and a bad input that reaches training ("msgfm pretraining: ...") fails the case:
errors must come at start-up.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from fixtures.make_vaihingen import write_vaihingen
from test_train_support import REPO, child_env, write_tiny_run

from msgfm.data.convert import run as convert
from msgfm.data.stats import write_stats

pytestmark = pytest.mark.slow

ERROR_PREFIX = {"pretrain": "pretrain: error:", "finetune": "finetune: error:", "msgfm": "msgfm "}
STARTED = ("msgfm pretraining:", "msgfm fine-tuning:")  # printed once training begins


@dataclass(frozen=True)
class Case:
    """One bad input: ``build(ws)`` makes it and returns the command-line arguments (options first, then
    dotted overrides); ``names`` must all appear in the error."""

    id: str
    entry: str  # pretrain | finetune | msgfm
    build: Callable[[Workspace], list[str]]
    names: tuple[str, ...]
    prefix: str = ""  # what the error line starts with, if not "<entry>: error:"


class Workspace:
    """The good inputs (tiny pretraining data and configs, Vaihingen-layout task shards) and variants of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "tiny").mkdir()
        write_tiny_run(root / "tiny", samples_per_group=12)
        self.data = root / "tiny" / "data"
        self.config = root / "tiny" / "tiny.yaml"
        self.ds_config = root / "tiny" / "ds_tiny.json"
        write_vaihingen(root / "vaihingen_raw", height=64, width=64)
        convert(["vaihingen", str(root / "vaihingen_raw"), "-o", str(root / "vaihingen"), "--size", "64",
                 "--workers", "1"])
        write_stats(sorted((root / "vaihingen").glob("*.h5")), progress=False)
        self.vaihingen = root / "vaihingen"
        (root / "a_file").write_text("not a folder")
        self.a_file = root / "a_file"

    def data_variant(self, name: str, change: Callable[[Path], object]) -> Path:
        """A copy of the pretraining data with ``change(copy)`` applied."""
        copy = self.root / name
        shutil.copytree(self.data, copy)
        change(copy)
        return copy

    def file(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        return path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _thirteen_band_s2(root: Path) -> None:
    with h5py.File(root / "sen12ms" / "part0.h5", "r+") as f:
        n, _, h, w = f["s2"].shape
        del f["s2"]
        f.create_dataset("s2", data=np.zeros((n, 13, h, w), np.float32), chunks=(1, 13, h, w))


def _nan_band(root: Path) -> None:
    with h5py.File(root / "mdas" / "part0.h5", "r+") as f:
        f["dsm"][...] = np.nan


@dataclass(frozen=True)
class DataCase:
    """One bad file among the pretraining data: ``change(data_root)`` makes it (each touches its own
    files); ``names`` must all appear in the error. Start-up lists every data problem in one error,
    so all of them run in one pretraining process (test_bad_data_is_one_clear_error)."""

    id: str
    change: Callable[[Path], object]
    names: tuple[str, ...]


def _truncated_copy(d: Path) -> None:
    shutil.copy(d / "rgb" / "part0.h5", d / "rgb" / "part2.h5")
    _truncate(d / "rgb" / "part2.h5")


DATA_CASES = [
    DataCase("corrupt (truncated) shard", _truncated_copy, ("rgb/part2.h5", "corrupt or truncated")),
    DataCase("empty shard file", lambda d: (d / "rgb" / "part1.h5").touch(),
             ("rgb/part1.h5", "cannot be opened as HDF5")),
    DataCase("mixed shards (a sen12ms shard among rgb)",
             lambda d: shutil.copy(d / "sen12ms" / "part0.h5", d / "rgb" / "other.h5"),
             ("rgb/other.h5: sensor dataset(s) ['rgb'] missing",)),
    DataCase("band count (13-band s2)", _thirteen_band_s2, ("sen12ms/part0.h5: sensor 's2' has 13 channels",)),
    DataCase("symbolic link loop as a shard", lambda d: (d / "rgb" / "loop.h5").symlink_to(d / "rgb" / "loop.h5"),
             ("rgb/loop.h5: a symbolic link loop",)),
    DataCase("stats missing", lambda d: (d / "mdas" / "stats.json").unlink(), ("mdas/stats.json", "msgfm stats")),
    DataCase("stats not JSON", lambda d: (d / "rgb" / "stats.json").write_text("{"), ("rgb/stats.json",)),
]


CASES = [
    # ---- configs
    Case("config key typo", "pretrain", lambda ws: ["train.max_stpes=3"], ("train.max_stpes",)),
    Case("config value of the wrong type", "pretrain", lambda ws: ["train.max_steps=many"], ("train.max_steps",)),
    Case("YAML syntax error in a config file", "pretrain",
         lambda ws: ["--config", str(ws.file("broken.yaml", "_base_: demo_cpu\ntrain:\n  max_steps: [3\n"))],
         ("broken.yaml", "line")),
    Case("YAML syntax error in an override", "finetune", lambda ws: ["--data-root", str(ws.vaihingen),
                                                                     "train.lr=[1"], ("override 'train.lr=[1'",)),
    # ---- ds_configs
    Case("ds_config not JSON", "pretrain", lambda ws: ["--deepspeed_config", str(ws.file("ds_bad.json", "{"))],
         ("ds_bad.json",)),
    Case("ds_config ZeRO-3 with MoE", "pretrain", lambda ws: [
        "--deepspeed_config", str(ws.file("ds_z3.json", json.dumps(
            {**json.loads(ws.ds_config.read_text()), "zero_optimization": {"stage": 3}})))], ("ds_z3.json", "ZeRO")),
    # ---- parallel layouts
    Case("expert parallelism that does not divide the world", "pretrain",
         lambda ws: ["model.moe.expert_parallel_size=2"], ("model.moe.expert_parallel_size",)),
    # ---- output folders
    Case("--output-dir is a file", "pretrain", lambda ws: ["--output-dir", str(ws.a_file)],
         ("--output-dir", "a_file is a file")),
    Case("--output-dir under a file", "finetune", lambda ws: ["--data-root", str(ws.vaihingen), "--output-dir",
                                                              str(ws.a_file / "run")], ("--output-dir", "a_file")),
    Case("prepare-sample into a file", "msgfm", lambda ws: ["prepare-sample", str(ws.a_file)], ("a_file",)),
    Case("convert --output under a file", "msgfm", lambda ws: [
        "convert", "vaihingen", str(ws.root / "vaihingen_raw"), "-o", str(ws.a_file / "x"), "--workers", "1"],
         ("--output", "a_file")),
    Case("convert --size 0", "msgfm", lambda ws: ["convert", "imagefolder", str(ws.root), "-o",
                                                  str(ws.root / "out"), "--size", "0"], ("--size",)),
    # ---- labels
    Case("segmentation class out of range", "finetune",
         lambda ws: ["--data-root", str(ws.vaihingen), "task.num_classes=2"],
         ("vaihingen-00000.h5", "labels/segmentation", "holds class", "task.num_classes is 2")),
    # ---- inspecting
    Case("inspect a corrupt shard", "msgfm", lambda ws: [
        "inspect", str(ws.data_variant("corrupt2", lambda d: _truncate(d / "rgb" / "part0.h5")) / "rgb" / "part0.h5")],
         ("part0.h5", "corrupt or truncated"), prefix="INVALID SHARD:"),
]


def command(entry: str, ws: Workspace, args: list[str], out: Path) -> list[str]:
    """The full command line: the good defaults of each entry point, then the case's options, then overrides."""
    options = [a for a in args if a.startswith("-") or not ("=" in a and "." in a.split("=")[0])]
    overrides = [a for a in args if a not in options]
    if entry == "pretrain":
        defaults = {"--deepspeed_config": str(ws.ds_config), "--config": str(ws.config), "--output-dir": str(out)}
        return [sys.executable, "launchers/pretrain.py", *_merge(defaults, options),
                "model.moe.expert_parallel_size=1", "tracking.enabled=false", *overrides]
    if entry == "finetune":
        defaults = {"--deepspeed_config": "ds_configs/cpu.json", "--task": "vaihingen", "--config": "ft_vaihingen_tiny",
                    "--output-dir": str(out)}
        return [sys.executable, "launchers/finetune.py", *_merge(defaults, options), "tracking.enabled=false",
                "transfer.init=random", *overrides]
    return [sys.executable, "-m", "msgfm.cli", *args]


def _merge(defaults: dict[str, str], options: list[str]) -> list[str]:
    given = dict(zip(options[::2], options[1::2], strict=True))
    return [x for key, value in {**defaults, **given}.items() for x in (key, value)]


def run_until_error(cmd: list[str], timeout: float = 240, stop_after: str | None = None,
                    on_line: Callable[[str, subprocess.Popen], None] | None = None) -> tuple[int, str]:
    """Run ``cmd``; stop it once it printed an error line (errors come at start-up, whatever a process does
    after them is not waited for), or when it starts training and ``stop_after`` is None."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env(drop_prefixes=("MLFLOW_",), OMP_NUM_THREADS="1"))
    lines: list[str] = []
    errored = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if ": error:" in line or (stop_after is None and line.startswith(STARTED)):
                errored.set()
            if on_line is not None:
                on_line(line, proc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not errored.is_set() and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is None:
        try:
            proc.wait(timeout=10)  # the error was printed: give the process a moment to exit by itself
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join(10)
    return proc.returncode, "".join(lines)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("bad_inputs"))


def check_error(rc: int, output: str, prefix: str, names: tuple[str, ...]) -> None:
    """Refused at start-up with a non-zero exit, no traceback, and an error naming ``names``."""
    assert not any(line.startswith(STARTED) for line in output.splitlines()), f"accepted:\n{output[-3000:]}"
    assert rc not in (0, None), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    error = output[output.index(prefix):] if prefix in output else ""
    assert error, output[-3000:]
    for name in names:
        assert name in error, f"{name!r} not in the error:\n{error}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error(case: Case, ws: Workspace, tmp_path):
    rc, output = run_until_error(command(case.entry, ws, case.build(ws), tmp_path / "run"))
    check_error(rc, output, case.prefix or ERROR_PREFIX[case.entry], case.names)


@pytest.fixture(scope="module")
def bad_data_run(ws: Workspace) -> tuple[int, str]:
    """One pretraining process over a copy of the data holding every DATA_CASES file."""
    root = ws.data_variant("bad_data", lambda d: [case.change(d) for case in DATA_CASES])
    return run_until_error(command("pretrain", ws, ["--data-root", str(root)], ws.root / "bad_data_run"))


@pytest.mark.parametrize("case", DATA_CASES, ids=[c.id for c in DATA_CASES])
def test_bad_data_is_one_clear_error(case: DataCase, bad_data_run: tuple[int, str]):
    rc, output = bad_data_run
    check_error(rc, output, ERROR_PREFIX["pretrain"], case.names)


def test_good_pretraining_run_ctrl_c_and_resume(ws: Workspace, tmp_path):
    """The good input beside the bad ones: trains; Ctrl-C after the first checkpoint exits 130 with one line
    naming it; the same command resumes from it and finishes."""
    out = tmp_path / "run"
    cmd = command("pretrain", ws, ["train.max_steps=40"], out)

    def interrupt_after_checkpoint(line: str, proc: subprocess.Popen) -> None:
        if "step 4: checkpoint" in line:
            proc.send_signal(signal.SIGINT)

    rc, output = run_until_error(cmd, stop_after="never", on_line=interrupt_after_checkpoint, timeout=400)
    assert rc == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    line = next(x for x in output.splitlines() if x.startswith("pretrain: interrupted"))
    assert "the newest complete checkpoint is" in line and "checkpoints/step0000000" in line and "resume" in line
    rc, output = run_until_error(command("pretrain", ws, ["train.max_steps=6"], out), stop_after="never", timeout=400)
    assert rc == 0 and "Traceback" not in output, output[-3000:]
    assert "resumed from" in output and "Done." in output


def test_good_finetuning_run(ws: Workspace, tmp_path):
    out = tmp_path / "run"
    rc, output = run_until_error(command("finetune", ws, ["--data-root", str(ws.vaihingen), "train.max_steps=2"],
                                         out), stop_after="never")
    assert rc == 0 and "Traceback" not in output, output[-3000:]
    assert (out / "best" / "model.pt").is_file()


def test_good_msgfm_commands(ws: Workspace, tmp_path):
    """prepare-sample's neighbours: a conversion into a new folder, statistics and inspect of good shards."""
    out = tmp_path / "converted"
    for args in (["convert", "vaihingen", str(ws.root / "vaihingen_raw"), "-o", str(out), "--size", "32",
                  "--workers", "1"],
                 ["stats", str(out / "vaihingen-00000.h5")],
                 ["inspect", str(ws.data / "rgb" / "part0.h5")]):
        result = subprocess.run(command("msgfm", ws, args, tmp_path), cwd=REPO, capture_output=True, text=True,
                                timeout=300, env=child_env(OMP_NUM_THREADS="1"))
        assert result.returncode == 0 and "Traceback" not in result.stderr, (args, result.stderr[-3000:])
    assert (out / "stats.json").is_file()
    # NaN pixels are invalid pixels (left out of the statistics, 0 after normalization); a band without any
    # valid pixel is recorded as mean 0, std 1 with a warning naming the sensor and band
    nan_shard = ws.data_variant("nan", _nan_band) / "mdas" / "part0.h5"
    result = subprocess.run(command("msgfm", ws, ["stats", str(nan_shard)], tmp_path), cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=child_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "sensor 'dsm' band 'elevation' has no valid pixel" in result.stderr

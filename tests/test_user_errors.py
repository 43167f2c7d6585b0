"""One-line errors for what users cause (issue 14, point 6): output folders, YAML syntax, Ctrl-C,
``--size 0``, unreadable and looping shard files, symbolic links and killed conversions in the
converters. In-process checks; tests/test_bad_inputs.py runs the same kinds through the real commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msgfm import cli
from msgfm.config import load_config
from msgfm.data.format import SensorArraySpec, ShardError, ShardWriter, read_shard_info
from msgfm.errors import UserError, check_output_folder
from msgfm.train.launch import INTERRUPTED_EXIT, run_reporting_user_errors

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads and writes whatever the permissions say


def test_output_folder_that_is_a_file_or_under_a_file_or_not_writable(tmp_path, monkeypatch):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(UserError, match=r"^--output-dir .*/file is a file, not a folder"):
        check_output_folder(file, "--output-dir")
    with pytest.raises(UserError, match=r"^--output-dir .*/file/run: .*/file is a file, so no folder can be created"):
        check_output_folder(file / "run", "--output-dir")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(UserError, match="broken or looping symbolic link"):
        check_output_folder(tmp_path / "loop" / "run", "--output-dir")
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)  # as a non-owner sees it
    with pytest.raises(UserError, match=r"^--output-dir .*/new/run: permission denied: .* is not writable"):
        check_output_folder(tmp_path / "new" / "run", "--output-dir")
    monkeypatch.undo()
    assert check_output_folder(tmp_path / "new" / "run", "--output-dir").is_dir()
    assert not (tmp_path / "other").exists() and check_output_folder(tmp_path / "other", "x", create=False)


@pytest.mark.skipif(ROOT_USER, reason="root may write into a read-only folder")
def test_output_folder_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(UserError, match="permission denied"):
        check_output_folder(locked / "run", "--output-dir")


def test_yaml_syntax_errors_name_the_file_line_and_override(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("_base_: demo_cpu\nmodel:\n  img_size: [32\ntrain: {}\n")
    with pytest.raises(UserError, match=r"^config .*bad.yaml: line 4, column 6: .*flow sequence that starts on "
                                        r"line 3\); fix the YAML syntax there$"):
        load_config(bad)
    with pytest.raises(UserError, match=r"^override 'train.max_steps=\[1': the value is not valid YAML"):
        load_config("demo_cpu", ["train.max_steps=[1"])


def _fake_checkpoint(run: Path) -> Path:
    ckpt = run / "checkpoints" / "step00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 4, "world_size": 1, "tag": ckpt.name}))
    (run / "checkpoints" / "latest").write_text(ckpt.name)
    return ckpt


def test_ctrl_c_is_exit_130_and_one_line_on_what_was_saved(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_reporting_user_errors("pretrain", interrupted, output_dir=tmp_path / "run") == INTERRUPTED_EXIT
    assert capsys.readouterr().err == (f"pretrain: interrupted (Ctrl-C); no checkpoint was saved in {tmp_path / 'run'}"
                                       f" yet; the same command starts the run again from the beginning\n")
    ckpt = _fake_checkpoint(tmp_path / "run")
    assert run_reporting_user_errors("pretrain", interrupted, output_dir=tmp_path / "run") == INTERRUPTED_EXIT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the newest complete checkpoint is {ckpt}" in err and "resume" in err
    monkeypatch.setenv("RANK", "1")  # the other ranks stop quietly: one line per run, not per rank
    assert run_reporting_user_errors("pretrain", interrupted, output_dir=tmp_path / "run") == INTERRUPTED_EXIT
    assert capsys.readouterr().err == ""


def test_an_error_after_ctrl_c_counts_as_the_interruption(tmp_path, capsys, monkeypatch):
    """A rank blocked in a collective sees Ctrl-C only as the error its departed peer causes."""
    import signal

    monkeypatch.delenv("RANK", raising=False)

    def blocked_in_a_collective() -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here, as it would when the C++ call returns
        except KeyboardInterrupt:
            pass
        raise RuntimeError("[gloo] Connection closed by peer")

    assert run_reporting_user_errors("pretrain", blocked_in_a_collective, output_dir=tmp_path) == INTERRUPTED_EXIT
    assert capsys.readouterr().err.startswith("pretrain: interrupted (Ctrl-C); no checkpoint was saved")
    with pytest.raises(RuntimeError, match="closed by peer"):  # without Ctrl-C the same error is a failure
        run_reporting_user_errors("pretrain", lambda: (_ for _ in ()).throw(RuntimeError("closed by peer")))


def _images(root: Path, count: int = 3) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"img{i}.png")


def test_ctrl_c_in_a_converter_is_one_line(tmp_path, capsys, monkeypatch):
    import msgfm.data.convert.imagefolder as imagefolder

    _images(tmp_path / "in")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(imagefolder, "run_from_args", interrupted)
    assert cli.main(["convert", "imagefolder", str(tmp_path / "in"), "-o", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert err.startswith("msgfm convert: interrupted (Ctrl-C); the shards finished so far are complete")
    assert err.count("\n") == 1


def test_ctrl_c_of_a_real_conversion_with_workers(tmp_path):
    """Ctrl-C as a terminal sends it (to the whole process group, workers included): exit 130, one line, no
    traceback from the main process or a worker, only complete shards left."""
    import signal

    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i in range(400):  # enough work (~2 s) to be interrupted halfway
        Image.fromarray(rng.integers(0, 256, (192, 192, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{i}.png")
    proc = subprocess.Popen([sys.executable, "-m", "msgfm.cli", "convert", "imagefolder", str(tmp_path / "in"), "-o",
                             str(tmp_path / "out"), "--workers", "2", "--samples-per-shard", "20", "--size", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    seen = b""
    while b"samples=40" not in seen and proc.poll() is None:
        seen += os.read(proc.stdout.fileno(), 4096)
    os.killpg(proc.pid, signal.SIGINT)
    output = (seen + proc.stdout.read()).decode().replace("\r", "\n")
    assert proc.wait(timeout=60) == 130, output[-2000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-2000:]
    assert output.strip().splitlines()[-1].startswith("msgfm convert: interrupted (Ctrl-C); the shards finished")
    shards = sorted((tmp_path / "out").iterdir())
    assert shards and all(p.name.startswith("images-") and p.suffix == ".h5" for p in shards)  # no partial file
    assert all(read_shard_info(p).num_samples == 20 for p in shards)


def test_size_zero_names_the_option(tmp_path, capsys):
    _images(tmp_path / "in", 1)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "imagefolder", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--size", "0"])
    assert exit_info.value.code == 2
    assert "argument --size: must be >= 1, got 0" in capsys.readouterr().err


def _shard(path: Path) -> Path:
    rgb = SensorArraySpec(dtype="uint8", channels=3, height=8, width=8)
    with ShardWriter(path, "rgb", {"rgb": rgb}) as writer:
        writer.append({"rgb": np.zeros((3, 8, 8), np.uint8)}, "a")
    return path


def test_unreadable_and_looping_shards_say_so(tmp_path, monkeypatch):
    loop = tmp_path / "loop.h5"
    loop.symlink_to(loop)
    with pytest.raises(ShardError, match="loop.h5: a symbolic link loop"):
        read_shard_info(loop)
    (tmp_path / "broken.h5").symlink_to(tmp_path / "gone.h5")
    with pytest.raises(ShardError, match="broken.h5: a broken symbolic link"):
        read_shard_info(tmp_path / "broken.h5")
    shard = _shard(tmp_path / "s.h5")

    def denied(path, *args, **kwargs):  # what a chmod 000 file gives a user other than root
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("msgfm.data.format.open", denied, raising=False)
    with pytest.raises(ShardError, match=r"s.h5: permission denied: this user cannot read the shard") as info:
        read_shard_info(shard)
    assert "corrupt" not in str(info.value)
    monkeypatch.undo()
    assert read_shard_info(shard).num_samples == 1


@pytest.mark.skipif(ROOT_USER, reason="root reads a chmod 000 file")
def test_chmod_000_shard_is_permission_denied(tmp_path):
    shard = _shard(tmp_path / "s.h5")
    shard.chmod(0)
    with pytest.raises(ShardError, match="permission denied"):
        read_shard_info(shard)


def test_converter_follows_linked_folders_reports_loops_and_removes_dead_partials(tmp_path):
    _images(tmp_path / "in" / "own", 2)
    _images(tmp_path / "elsewhere", 3)
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "in" / "back").symlink_to(tmp_path / "in", target_is_directory=True)  # a folder loop
    (tmp_path / "in" / "self.png").symlink_to(tmp_path / "in" / "self.png")  # a file loop
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = out / f".images-00000.h5.partial-{int(done.stdout)}"  # the pid of a finished process
    alive = out / f".images-00001.h5.partial-{os.getppid()}"  # another process's writer, still running
    dead.write_bytes(b"x")
    alive.write_bytes(b"x")
    assert cli.main(["convert", "imagefolder", str(tmp_path / "in"), "-o", str(out), "--size", "16",
                     "--workers", "1"]) == 0
    report = json.loads((out / "images.skipped.json").read_text())
    assert report["samples_written"] == 5  # 2 own + 3 in the linked folder
    reasons = {Path(r["item"]).name: r["reason"] for r in report["skipped"]}
    assert reasons["self.png"].startswith("symbolic link loop") and reasons["back"].startswith("symbolic link loop")
    assert not dead.exists() and alive.exists()


def test_interrupt_before_a_new_shard_writer_is_held_leaves_no_partial(tmp_path, monkeypatch):
    """Ctrl-C that lands after a writer created its file but before run_conversion holds the writer (the race
    the real Ctrl-C test above hit now and then): the unfinished file goes too."""
    from msgfm.data.convert import common

    class InterruptedWriter(ShardWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            raise KeyboardInterrupt  # the file exists; the caller never gets the writer

    monkeypatch.setattr(common, "ShardWriter", InterruptedWriter)
    with pytest.raises(KeyboardInterrupt):
        common.run_conversion(items=[0, 1], load=_EightByEight(), output_dir=tmp_path / "out", group="images",
                              sensors={"rgb": SensorArraySpec(dtype="uint8", channels=3, height=8, width=8)},
                              prefix="images", samples_per_shard=1, workers=1)
    assert list((tmp_path / "out").iterdir()) == []


class _EightByEight:
    def __call__(self, item):
        from msgfm.data.convert.common import LoadResult, Sample

        return LoadResult(samples=[Sample(f"s{item}", {"rgb": np.zeros((3, 8, 8), np.uint8)})])

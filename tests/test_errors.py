"""Errors the user caused are one line; everything else keeps its traceback (msgfm.errors)."""
from __future__ import annotations

import errno
import subprocess
import sys

import pytest
from test_train_support import REPO

from msgfm.errors import MissingFileError, UserError, user_message
from msgfm.train.launch import run_reporting_user_errors


def _raise(err: BaseException):
    def job() -> int:
        raise err
    return job


def test_user_message_tells_user_errors_from_bugs():
    assert user_message(UserError("config key 'x': bad")) == "config key 'x': bad"
    assert isinstance(MissingFileError("gone"), FileNotFoundError) and user_message(MissingFileError("gone")) == "gone"
    assert user_message(PermissionError(errno.EACCES, "Permission denied", "runs/x")) == "permission denied: runs/x"
    assert user_message(OSError(errno.ENOSPC, "No space left on device", "ckpt.pt")).startswith(
        "no space left on device writing ckpt.pt")
    assert user_message(ValueError("raised by torch inside a step")) is None  # a bug or a library failure
    assert user_message(KeyError("x")) is None


def test_launcher_prints_one_line_for_user_errors_and_keeps_tracebacks_of_bugs(capsys):
    assert run_reporting_user_errors("pretrain", _raise(UserError("data root x does not exist"))) == 2
    assert capsys.readouterr().err == "pretrain: error: data root x does not exist\n"
    with pytest.raises(ValueError, match="inside a step"):  # e.g. DeepSpeed mid-run: not the user's doing
        run_reporting_user_errors("pretrain", _raise(ValueError("inside a step")))
    with pytest.raises(UserError):  # -v: the traceback of a user error too
        run_reporting_user_errors("pretrain", _raise(UserError("x")), verbose=True)


def test_pretrain_launcher_takes_verbose():
    result = subprocess.run([sys.executable, "launchers/pretrain.py", "--deepspeed_config", "ds_configs/cpu.json",
                             "--config", "no_such_config", "-v"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "Traceback" in result.stderr and "no_such_config" in result.stderr
    quiet = subprocess.run([sys.executable, "launchers/pretrain.py", "--deepspeed_config", "ds_configs/cpu.json",
                            "--config", "no_such_config"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith("pretrain: error:") and "no_such_config" in quiet.stderr

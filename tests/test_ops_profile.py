"""launchers/profile_kernels.py without a GPU: its help, its shapes, and a clear refusal on CPU."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from msgfm.config import load_config
from msgfm.ops.benchmark import (
    ProfileRow,
    ProfileShape,
    attention_bytes,
    format_table,
    parse_shape,
    swin_stage_shapes,
    target_summary,
    write_reports,
)

LAUNCHER = Path(__file__).resolve().parents[1] / "launchers" / "profile_kernels.py"


@pytest.fixture(scope="module")
def launcher():
    spec = importlib.util.spec_from_file_location("profile_kernels_launcher", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_documents_the_tool(launcher, capsys):
    with pytest.raises(SystemExit) as exit_info:
        launcher.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("eager, sdpa, fused", "median", "--shape", "--mlflow", "CUDA device", "copy bandwidth", "trace"):
        assert word in text, word


def test_swin_b_stage_shapes_at_batch_128():
    shapes = swin_stage_shapes(load_config("msgfm_swinb_192"), batch=128)
    plain = {s.name: s for s in shapes}
    assert [s.name for s in shapes] == ["stage1", "stage1_shift", "stage2", "stage2_shift", "stage3",
                                        "stage3_shift", "stage4"]
    for stage in range(4):
        s = plain[f"stage{stage + 1}"]
        assert (s.height, s.channels, s.num_heads, s.window_size) == (48 // 2**stage, 128 * 2**stage, 4 * 2**stage, 6)
        assert s.channels // s.num_heads == 32
    assert plain["stage1_shift"].shift_size == 3
    assert plain["stage4"].num_windows == 128  # the 6x6 map is one window per image, never shifted


def test_custom_shapes_are_parsed_and_checked():
    assert parse_shape("4,24,24,64,2,12,6") == ProfileShape("custom", 4, 24, 24, 64, 2, 12, 6)
    assert parse_shape("4,24,24,64,2,12").shift_size == 0
    with pytest.raises(ValueError, match="expected B,H,W,C,heads,window"):
        parse_shape("4,24,24")
    with pytest.raises(ValueError, match="window 7 must divide 24x24"):
        parse_shape("4,24,24,64,2,7")


def test_compulsory_bytes_count_qkv_and_output_once():
    shape = ProfileShape("s", 1, 6, 6, 32, 1, 6, 0)  # one window, 36 tokens
    assert attention_bytes(shape, 2, backward=False) == 36 * 4 * 32 * 2 + 36 * 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_on_cpu_it_says_it_needs_cuda_and_exits_2(launcher, capsys, tmp_path):
    assert launcher.main(["--out-dir", str(tmp_path)]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written


def _row(op: str, impl: str, median_ms: float, pass_: str = "fwd+bwd") -> ProfileRow:
    return ProfileRow(shape="stage1", op=op, impl=impl, pass_=pass_, median_ms=median_ms, p10_ms=median_ms,
                      p90_ms=median_ms, peak_mib=1.0, gbs=100.0, pct_copy_bw=10.0, speedup=1.0)


def test_target_summary_and_reports_from_rows(tmp_path):
    rows = [_row("attention", "eager", 3.0), _row("attention", "sdpa", 1.2), _row("attention", "fused", 1.0),
            _row("window_process", "torch", 1.0)]
    lines = target_summary(rows)
    assert lines[0].endswith("3.00x (target >= 2.0x: met)")
    assert lines[1].endswith("1.20x (target >= 1.3x: NOT met)")
    assert "not measured" in lines[2]
    assert format_table(rows).count("\n") == 2 + len(rows)
    md_path, json_path = write_reports(rows, {"device": "test"}, tmp_path)
    assert "NOT met" in md_path.read_text() and '"targets"' in json_path.read_text()

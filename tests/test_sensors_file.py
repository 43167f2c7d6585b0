"""--sensors FILE.yaml: sensors declared in a file, registered by every msgfm command that names or
reads sensors (convert, stats, inspect), with one-line errors that name the file."""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import pytest
from fixtures.six_band_scene import SENSORS_YAML, write_six_band_scene

from msgfm import cli
from msgfm.data.convert.common import LoadResult
from msgfm.sensors import SensorSpec, add_sensors_arg, get_sensor, list_sensors, load_sensors_file, register_sensor


def test_load_sensors_file_registers_and_accepts_a_run_config(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(SENSORS_YAML.format(name="test_file_oli"))
    specs = load_sensors_file(tmp_path / "s.yaml")
    assert [s.name for s in specs] == ["test_file_oli"] and get_sensor("test_file_oli").num_channels == 6
    assert get_sensor("test_file_oli").rgb_bands == (2, 1, 0) and get_sensor("test_file_oli").gsd_m is None
    (tmp_path / "run.yaml").write_text("_base_: demo_cpu\nsensors:\n  test_run_lidar:\n    bands: [intensity]\n")
    assert [s.name for s in load_sensors_file(tmp_path / "run.yaml")] == ["test_run_lidar"]
    assert "test_run_lidar" in list_sensors()


@pytest.mark.parametrize(("text", "message"), [
    ("x: [1, 2\n", r"bad.yaml: not valid YAML"),
    ("- a\n- b\n", r"bad.yaml: expected a mapping of sensor name to spec"),
    ("test_bad:\n  bands: [a]\n  gsd: 3\n", r"bad.yaml: sensor 'test_bad': unknown keys \['gsd'\]"),
    ("rgb:\n  bands: [r, g, b, nir]\n", r"bad.yaml: sensor 'rgb' is built in .* cannot be redefined"),
    ("model: {img_size: 32}\n", r"bad.yaml is a config without a 'sensors:' section"),
])
def test_bad_sensors_files_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_sensors_file(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="sensors file .*missing.yaml: no such file"):
        load_sensors_file(tmp_path / "missing.yaml")


def test_a_built_in_sensor_may_be_repeated_unchanged(tmp_path: Path) -> None:
    (tmp_path / "same.yaml").write_text("sar:\n  bands: [VV, VH]\n  gsd_m: 10.0\n  rgb_bands: [0]\n"
                                        "  description: Sentinel-1 C-band SAR, VV and VH backscatter in dB\n")
    assert load_sensors_file(tmp_path / "same.yaml")[0] == get_sensor("sar")


def test_every_sensor_command_takes_sensors(tmp_path: Path, capsys) -> None:
    """convert -> stats -> inspect through `msgfm` with a sensor known only from the file."""
    write_six_band_scene(tmp_path / "scene.tif", size=64)
    (tmp_path / "s.yaml").write_text(SENSORS_YAML.format(name="test_cli_oli"))
    shards = tmp_path / "shards"
    assert cli.main(["convert", "geotiff", str(tmp_path / "scene.tif"), "--sensor", "test_cli_oli", "--sensors",
                     str(tmp_path / "s.yaml"), "--size", "32", "-o", str(shards), "--workers", "1"]) == 0
    assert cli.main(["stats", str(shards / "*.h5"), "--sensors", str(tmp_path / "s.yaml"), "--quiet"]) == 0
    assert cli.main(["inspect", str(shards / "tiles-00000.h5"), "--sensors", str(tmp_path / "s.yaml")]) == 0
    out = capsys.readouterr().out
    assert "wrote 4 samples" in out and "test_cli_oli      swir2  mean" in out
    assert "bands ['blue', 'green', 'red', 'nir', 'swir1', 'swir2']" in out and "gsd_m 30.0" in out


def test_unknown_sensor_points_to_sensors_and_a_bad_file_is_one_line(tmp_path: Path, capsys) -> None:
    write_six_band_scene(tmp_path / "scene.tif", size=32)
    assert cli.main(["convert", "geotiff", str(tmp_path / "scene.tif"), "--sensor", "test_never_declared",
                     "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown sensor 'test_never_declared'" in err and "--sensors FILE.yaml" in err
    (tmp_path / "bad.yaml").write_text("test_x:\n  bands: []\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["stats", "x.h5", "--sensors", str(tmp_path / "bad.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --sensors:" in err and "bad.yaml: sensor 'test_x': needs at least one band" in err
    assert "Traceback" not in err


def test_add_sensors_arg_is_a_hook_for_new_commands(tmp_path: Path) -> None:
    """A future command (export, predict) gets --sensors with one call; files may be given twice."""
    (tmp_path / "a.yaml").write_text("test_hook_a:\n  bands: [a]\n")
    (tmp_path / "b.yaml").write_text("test_hook_b:\n  bands: [b1, b2]\n")
    parser = argparse.ArgumentParser()
    add_sensors_arg(parser)
    args = parser.parse_args(["--sensors", str(tmp_path / "a.yaml"), "--sensors", str(tmp_path / "b.yaml")])
    assert args.sensors_files == [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    assert get_sensor("test_hook_b").bands == ("b1", "b2") and get_sensor("test_hook_a").num_channels == 1
    assert parser.parse_args([]).sensors_files == []


def _load_nothing(item: int) -> LoadResult:
    return LoadResult()


def test_converter_workers_know_the_sensors_registered_here(monkeypatch) -> None:
    """A spawned worker process starts with the built-in sensors; the load call brings the others."""
    from msgfm import sensors
    from msgfm.data.convert.common import _LoadCall

    register_sensor(SensorSpec(name="test_worker_only", bands=("a", "b")))
    call = pickle.loads(pickle.dumps(_LoadCall(_load_nothing)))
    monkeypatch.delitem(sensors._REGISTRY, "test_worker_only")  # as in a fresh process
    call(0)
    assert get_sensor("test_worker_only").bands == ("a", "b")

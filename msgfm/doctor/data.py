"""The data of a run config: every group's shards and statistics open (the same start-up
validation training runs), one batch per group is read and augmented on the host, and a
fingerprint of config and data is taken for the ranks to compare."""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

from msgfm.config import RunConfig
from msgfm.data.dataset import GroupDataset
from msgfm.data.device_transforms import collate_raw
from msgfm.data.pipeline import train_transform
from msgfm.data.plan import DataValidationError, GroupSummary, plan_data
from msgfm.doctor.report import FAIL, OK, WARN, Check, skipped


def fingerprint(obj: Any) -> str:
    """A short hash of a JSON-able object (keys sorted): equal on every rank that sees the same thing."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_checks(cfg: RunConfig, data_root: Path | None) -> tuple[list[Check], str | None]:
    """Rows for the data (skipped without a data root) and the data fingerprint (None without data)."""
    if data_root is None:
        return [skipped("data", "skipped: no --data-root given", todo="pass --data-root to check shards, stats "
                                                                       "and reading speed")], None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            plan = plan_data(cfg, data_root)
        except DataValidationError as err:
            problems = str(err).splitlines()
            return [Check(name="data: shards and stats", status=FAIL, result=problems[0],
                          todo="fix each problem listed below (each names its group, file and the command to run)",
                          details="\n".join(line.strip() for line in problems[1:]))], None
    summaries = plan.summaries
    rows = [Check(name="data: shards and stats", status=OK,
                  result=f"{len(summaries)} group(s) under {data_root}: shards open, statistics match the sensors")]
    rows += [Check(name="data: warning", status=WARN, result=str(w.message)[:300], todo="see the message")
             for w in caught if issubclass(w.category, UserWarning)]
    rows += [read_speed_check(cfg, summary, plan.batch_sizes[name]) for name, summary in summaries.items()]
    content = {name: {"shards": [[str(i.path), i.num_samples, Path(i.path).stat().st_size] for i in s.shards],
                      "stats": s.stats.to_dict() if s.stats else None}
               for name, s in summaries.items()}
    return rows, fingerprint(content)


def read_speed_check(cfg: RunConfig, summary: GroupSummary, batch_size: int) -> Check:
    """Read one batch of a group in this process as a loader worker does (stored arrays, crops and flips
    drawn; normalization and augmentation run later on the training device): host samples/s per worker."""
    group = cfg.data.group(summary.name)
    dataset = GroupDataset(summary.shards, group.sensors, summary.statistics, train_transform(cfg),
                           name=group.name)
    count = min(batch_size, len(dataset))
    dataset[0]  # opens the file: not what a running worker pays per batch
    started = time.perf_counter()
    collate_raw(dataset.__getitems__([(i % len(dataset), i) for i in range(count)]))
    seconds = time.perf_counter() - started
    per_worker = count / max(seconds, 1e-9)
    workers = group.num_workers
    total = f"; x {workers} workers ~ {per_worker * workers:,.0f}/s" if workers else " (num_workers 0: in the " \
                                                                                        "training process)"
    return Check(name=f"data: group {group.name}", status=OK,
                 result=f"{summary.num_samples} samples in {len(summary.shards)} shard(s); one batch of {count} "
                        f"read in {seconds * 1e3:.1f} ms = {per_worker:,.0f} samples/s per worker{total}",
                 data={"samples": summary.num_samples, "batch": count, "seconds": round(seconds, 4),
                       "samples_per_s_per_worker": round(per_worker, 1), "num_workers": workers})

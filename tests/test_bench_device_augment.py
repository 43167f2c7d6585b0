"""The device-side benchmark a GPU session runs (`python -m msgfm.bench.data --device cuda`),
smoke-tested on the CPU with the tiny config: it measures every group and the whole step."""
from __future__ import annotations

import re

import torch

from msgfm.bench.device_augment import report


def test_device_side_report_times_every_group_and_the_step():
    lines = report("demo_cpu", torch.device("cpu"), model_step=True, repeats=1)
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"group", "rgb", "sen12ms", "mdas", "step"}
    for name in ("rgb", "sen12ms", "mdas", "step"):
        augment_ms, step_ms, share = (cell.strip() for cell in rows[name].split("|")[4:7])
        assert float(augment_ms) > 0 and float(step_ms) > 0
        assert 0 < float(share.rstrip("%")) < 100
    assert "| 12 |" in rows["step"]  # demo_cpu: 8 + 2 + 2 samples
    memory = re.search(r"calls per group: ([\d, ]+) MiB", lines[-1])
    assert memory and len(memory.group(1).split(",")) == 3

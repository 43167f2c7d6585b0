"""``make demo``'s training (demo_cpu on the prepared real sample, 2 CPU ranks) gives the recorded losses."""
from __future__ import annotations

import json

import pytest
from reference_losses import REFERENCE, compare, run_demo

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.realdata]


def test_demo_losses_equal_the_recorded_reference(tmp_path):
    reference = json.loads(REFERENCE.read_text())
    losses = run_demo(tmp_path, tmp_path / "sample")  # prepares the sample as `make demo` does
    assert len(losses) == len(reference["demo"]) == 12
    problems = compare(losses, reference["demo"], reference["machine"])
    assert not problems, "\n".join(problems[:10])

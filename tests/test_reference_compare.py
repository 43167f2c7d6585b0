"""How recorded losses are compared: exactly on the recording machine kind, first step only elsewhere."""
from __future__ import annotations

from reference_losses import compare, machine

RECORDED = {"1": {"train/loss": 2.5, "train/rgb/loss": 0.8}, "2": {"train/loss": 2.0, "train/rgb/loss": 0.7}}


def _with(step: str, key: str, value: float) -> dict[str, dict[str, float]]:
    table = {s: dict(row) for s, row in RECORDED.items()}
    table[step][key] = value
    return table


def test_same_machine_kind_flags_a_one_ulp_difference_at_any_step():
    here = machine()
    assert compare(RECORDED, RECORDED, here) == []
    problems = compare(_with("2", "train/rgb/loss", 0.7000000000000001), RECORDED, here)
    assert len(problems) == 1 and problems[0].startswith("step 2 train/rgb/loss")


def test_other_machine_kind_compares_the_first_step_within_rounding():
    elsewhere = {**machine(), "cpu": "some other CPU"}
    assert compare(_with("2", "train/loss", 2.3), RECORDED, elsewhere) == []  # later drift is not a change
    assert compare(_with("1", "train/loss", 2.5 * (1 + 5e-5)), RECORDED, elsewhere) == []
    problems = compare(_with("1", "train/rgb/loss", 0.81), RECORDED, elsewhere)
    assert len(problems) == 1 and "step 1 train/rgb/loss" in problems[0]


def test_different_logged_steps_are_a_difference_anywhere():
    assert compare({"1": RECORDED["1"]}, RECORDED, machine())
    assert compare({"1": RECORDED["1"]}, RECORDED, {**machine(), "cpu": "x"})

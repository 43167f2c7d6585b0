"""The doctor's rows (:class:`Check`) and how they are shown: one table, details of what failed, JSON."""
from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from msgfm.errors import UserError

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
NO_CUDA = "skipped: no CUDA device"
# Column widths of the printed table (check, status, result, what to do); long cells wrap.
WIDTHS = (26, 6, 56, 52)


@dataclass(kw_only=True)
class Check:
    """One row of the doctor's table.

    ``status`` is one of ok / warn / FAIL / skip; ``todo`` says what to do about anything but
    ok; ``details`` (printed below the table) holds long text such as a compiler log;
    ``data`` the measured numbers, for the JSON report."""

    name: str
    status: str
    result: str
    todo: str = ""
    details: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in (OK, WARN, FAIL, SKIP):
            raise UserError(f"check {self.name}: status must be one of ok, warn, FAIL, skip, got {self.status!r}")


def skipped(name: str, reason: str = NO_CUDA, todo: str = "") -> Check:
    """A row for a check that does not apply here."""
    return Check(name=name, status=SKIP, result=reason if reason.startswith("skipped") else f"skipped: {reason}",
                 todo=todo)


def failures(checks: Sequence[Check]) -> list[Check]:
    """The rows that make the doctor exit non-zero."""
    return [c for c in checks if c.status == FAIL]


def _cell_lines(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines += textwrap.wrap(paragraph, width, break_long_words=True, break_on_hyphens=False) or [""]
    return lines


def format_table(checks: Sequence[Check]) -> str:
    """The checks as one plain-text table (cells wrap inside their column), then the details of
    every row that has any, then a one-line verdict."""
    header = ("check", "status", "result", "what to do")
    rule = "-+-".join("-" * w for w in WIDTHS)
    out = [" | ".join(h.ljust(w) for h, w in zip(header, WIDTHS)).rstrip(), rule]
    for check in checks:
        cells = [_cell_lines(text, w) for text, w in zip((check.name, check.status, check.result, check.todo),
                                                         WIDTHS)]
        for i in range(max(len(c) for c in cells)):
            out.append(" | ".join((c[i] if i < len(c) else "").ljust(w) for c, w in zip(cells, WIDTHS)).rstrip())
    detailed = [c for c in checks if c.details]
    for check in detailed:
        out += ["", f"{check.name} ({check.status}):", textwrap.indent(check.details.rstrip(), "  ")]
    failed = failures(checks)
    warned = [c for c in checks if c.status == WARN]
    out.append("")
    if failed:
        out.append(f"{len(failed)} check(s) failed: {', '.join(c.name for c in failed)}")
    else:
        out.append(f"all checks passed ({len(warned)} warning(s))" if warned else "all checks passed")
    return "\n".join(out)


def write_json(checks: Sequence[Check], path: Path, meta: dict[str, Any] | None = None) -> None:
    """Every row with its numbers, for scripts (msgfm.bench.gpu_check reads it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta or {}, "failed": len(failures(checks)), "checks": [asdict(c) for c in checks]}
    path.write_text(json.dumps(payload, indent=2, default=str))

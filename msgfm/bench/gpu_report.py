"""What msgfm.bench.gpu_check makes of its parts' outputs: loss agreement of the attention
implementations, fp16 loss-scale calibration, the issue's targets, and the markdown report
and closing table. Pure functions of the JSON the parts wrote, so the tests drive them with
canned numbers."""
from __future__ import annotations

import math
from typing import Any

# The first losses compared between two runs that differ only in the attention implementation:
# the FLOP-counting step (eager in both, so equal) and the next three, while the weights have
# moved little. Tolerances are relative and per precision (a few ulps of bf16 / fp16).
LOSS_AGREE_STEPS = 4
LOSS_RTOL = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 2e-2}
MFU_TARGET_BF16 = 35.0  # percent, H100/H200 (issue 9)


def loss_agreement(name_a: str, run_a: dict[str, Any], name_b: str, run_b: dict[str, Any],
                   steps: int = LOSS_AGREE_STEPS) -> dict[str, Any]:
    """Max relative difference of the summed loss over the first ``steps`` steps of two runs."""
    precision = run_a["precision"]
    a, b = run_a["total_loss"][:steps], run_b["total_loss"][:steps]
    compared = min(len(a), len(b))
    diffs = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
    worst = max(diffs) if diffs else math.inf
    tolerance = LOSS_RTOL.get(precision, LOSS_RTOL["fp32"])
    return {"runs": [name_a, name_b], "precision": precision, "steps": compared, "losses_a": a, "losses_b": b,
            "max_rel_diff": worst, "tolerance": tolerance, "agree": bool(compared and worst <= tolerance)}


def loss_scale_summary(run: dict[str, Any]) -> dict[str, Any]:
    """fp16 dynamic loss scaling: overflows while the scale calibrates (the unbroken run of skipped
    steps from the first step on) and any later ones, which the issue's target says must not happen."""
    overflows = list(run.get("overflow_steps", []))
    calibration = 0
    while calibration < len(overflows) and overflows[calibration] == calibration:
        calibration += 1
    scales = run.get("loss_scale_history", [])
    return {"overflows": len(overflows), "calibration_overflows": calibration,
            "late_overflows": overflows[calibration:],
            "scale_first": scales[0] if scales else None, "scale_last": scales[-1] if scales else None,
            "finite": bool(run.get("finite")), "steps": run.get("steps", 0) + run.get("warmup", 0) + 1}


def targets(profile_bf16: dict[str, Any] | None, runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 9's targets, each with the measured number (None when not measured) and whether it is met."""
    out: list[dict[str, Any]] = []
    speedup = None
    if profile_bf16:
        median = {(r["op"], r["impl"]): r["median_ms"] for r in profile_bf16.get("rows", [])
                  if r["shape"] == "stage1" and r["pass_"] == "fwd+bwd"}
        if ("attention", "fused") in median and ("attention", "sdpa") in median:
            speedup = median[("attention", "sdpa")] / median[("attention", "fused")]
    out.append({"target": "fused attention fwd+bwd vs sdpa, stage 1, bf16", "want": ">= 1.3x",
                "measured": None if speedup is None else f"{speedup:.2f}x",
                "met": None if speedup is None else speedup >= 1.3})
    for precision in ("bf16", "fp16"):
        fused, sdpa = runs.get(f"{precision} fused"), runs.get(f"{precision} sdpa")
        if fused and sdpa:
            ratio = sdpa["s_per_step"] / fused["s_per_step"]
            out.append({"target": f"training step with fused faster than sdpa ({precision})", "want": "> 1.00x",
                        "measured": f"{ratio:.2f}x ({fused['s_per_step']:.3f} vs {sdpa['s_per_step']:.3f} s/step)",
                        "met": ratio > 1.0})
        else:
            out.append({"target": f"training step with fused faster than sdpa ({precision})", "want": "> 1.00x",
                        "measured": None, "met": None})
    bf16 = runs.get("bf16 fused")
    mfu = bf16.get("mfu_pct") if bf16 else None
    out.append({"target": "MFU of the paper model, bf16, fused (H100/H200)", "want": f">= {MFU_TARGET_BF16:g}%",
                "measured": None if mfu is None else f"{mfu:.1f}%",
                "met": None if mfu is None else mfu >= MFU_TARGET_BF16})
    fp16 = runs.get("fp16 fused")
    if fp16:
        scaling = loss_scale_summary(fp16)
        met = scaling["finite"] and not scaling["late_overflows"]
        out.append({"target": "fp16 + loss scaling: finite losses, no overflow after calibration", "want": "yes",
                    "measured": f"finite {scaling['finite']}, {scaling['calibration_overflows']} calibration "
                                f"overflow(s), late overflows at optimizer steps {scaling['late_overflows']}",
                    "met": met})
    else:
        out.append({"target": "fp16 + loss scaling: finite losses, no overflow after calibration", "want": "yes",
                    "measured": None, "met": None})
    return out


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def parts_table(parts: list[dict[str, Any]]) -> str:
    """Markdown table of the parts against their budgets."""
    lines = ["| part | status | seconds | budget s | note |", "|---|---|---:|---:|---|"]
    for p in parts:
        over = " (over budget)" if p["seconds"] > p["budget_s"] and p["status"] != "skip" else ""
        lines.append(f"| {p['name']} | {p['status']} | {p['seconds']:.1f} | {p['budget_s']:.0f} | "
                     f"{p['note'].replace('|', '/')}{over} |")
    return "\n".join(lines)


def runs_table(runs: dict[str, dict[str, Any]]) -> str:
    """Markdown table, one line per training run."""
    lines = ["| run | attention / window process | samples/s | s/step | TFLOP/s | MFU % | peak GiB | "
             "overflows | loss scale first -> last | loss first -> last | finite |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for name, r in runs.items():
        scales = r.get("loss_scale_history") or []
        scale = f"{scales[0]:g} -> {scales[-1]:g}" if scales else "-"
        losses = r.get("total_loss") or [math.nan]
        lines.append(f"| {name} | {r['attention']} / {r['window_process']} | {r['samples_per_s']:.1f} | "
                     f"{r['s_per_step']:.3f} | {r['achieved_tflops']:.2f} | {_fmt(r.get('mfu_pct'))} | "
                     f"{_fmt(r.get('peak_memory_gib'), '.2f')} | {len(r.get('overflow_steps', []))} | {scale} | "
                     f"{losses[0]:.4f} -> {losses[-1]:.4f} | {r.get('finite')} |")
    return "\n".join(lines)


def targets_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the targets."""
    lines = ["| target | want | measured | met |", "|---|---|---|---|"]
    for t in rows:
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**NO**")
        lines.append(f"| {t['target']} | {t['want']} | {t['measured'] or '-'} | {met} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """The whole report: environment, parts, runs, loss agreement, targets, kernel profile, doctor."""
    env = report.get("environment", {})
    out = [f"# msgfm GPU check ({report['mode']})", ""]
    out += [f"- {key}: {value}" for key, value in env.items()]
    out += [f"- started: {report['started']}; total {report['total_s']:.0f} s of a {report['budget_s']:.0f} s budget",
            "", "## Parts", "", parts_table(report["parts"]), ""]
    if report.get("train"):
        out += ["## Training runs (msgfm.bench.train)", "", runs_table(report["train"]), ""]
    for agreement in report.get("loss_agreement", []):
        verdict = "agree" if agreement["agree"] else "**DISAGREE**"
        out += [f"- {' vs '.join(agreement['runs'])}: max relative loss difference over the first "
                f"{agreement['steps']} steps {agreement['max_rel_diff']:.2e} (tolerance {agreement['tolerance']:.0e}): "
                f"{verdict}"]
    if report.get("loss_scaling"):
        s = report["loss_scaling"]
        out += [f"- fp16 loss scale {s['scale_first']} -> {s['scale_last']}: {s['overflows']} overflow(s), "
                f"{s['calibration_overflows']} while calibrating, later ones at optimizer steps {s['late_overflows']}"]
    out += ["", "## Targets (issue 9; measured, never asserted)", "", targets_table(report.get("targets", [])), ""]
    for dtype, profile in report.get("profiles", {}).items():
        out += [f"## Kernel profile ({dtype}, launchers/profile_kernels.py)", "", profile.get("table", ""), ""]
        out += [f"- {line}" for line in profile.get("targets", [])] + [""]
    if report.get("kernel_tests"):
        out += ["## tests/test_kernels_cuda.py", "", "```", report["kernel_tests"].get("summary", ""), "```", ""]
    if report.get("doctor"):
        out += ["## msgfm doctor", "", "```", report["doctor"].get("table", ""), "```", ""]
    return "\n".join(out)


def closing_table(report: dict[str, Any]) -> str:
    """The short plain-text table the run ends with (the device tool returns the end of the output)."""
    lines = [f"{'part':<24} {'status':<6} {'s':>7} {'budget':>7}  note"]
    for p in report["parts"]:
        lines.append(f"{p['name']:<24} {p['status']:<6} {p['seconds']:>7.1f} {p['budget_s']:>7.0f}  {p['note'][:90]}")
    if report.get("train"):
        lines.append("")
        lines.append(f"{'run':<14} {'samples/s':>10} {'s/step':>8} {'MFU %':>6} {'peak GiB':>9} {'overflows':>9}")
        for name, r in report["train"].items():
            lines.append(f"{name:<14} {r['samples_per_s']:>10.1f} {r['s_per_step']:>8.3f} "
                         f"{_fmt(r.get('mfu_pct')):>6} {_fmt(r.get('peak_memory_gib'), '.2f'):>9} "
                         f"{len(r.get('overflow_steps', [])):>9}")
    for agreement in report.get("loss_agreement", []):
        lines.append(f"losses {' vs '.join(agreement['runs'])}: max rel diff {agreement['max_rel_diff']:.1e} "
                     f"(tol {agreement['tolerance']:.0e}) -> {'agree' if agreement['agree'] else 'DISAGREE'}")
    for t in report.get("targets", []):
        met = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"target {t['target']}: {t['measured'] or '-'} (want {t['want']}): {met}")
    over = report["total_s"] > report["budget_s"]
    lines.append(f"total {report['total_s']:.0f} s of {report['budget_s']:.0f} s budget"
                 f"{' -- OVER BUDGET' if over else ''}; failed parts: {report['failed_parts'] or 'none'}")
    return "\n".join(lines)

"""The lab's report: ``results.json`` and one self-contained ``report.html`` (figures embedded as base64)."""

from __future__ import annotations

import base64
import html
import json
import os
from typing import Any

VERDICT_COLORS = {
    "supported": "#2e7d32",
    "not supported": "#c62828",
    "mixed": "#ef6c00",
    "inconclusive": "#6a1b9a",
    "not evaluated": "#616161",
}


def write_json(results: dict[str, Any], out_dir: str) -> str:
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
    return path


def summary_table(results: dict[str, Any]) -> str:
    """The terminal's summary: one line per claim with its verdict."""
    lines = [f"{'#':>3}  {'claim':<44} {'verdict':<14} {'pass/fail/?':>11} {'seeds':>5} {'cpu':>7}", "-" * 89]
    for c in results["claims"]:
        states = [ch.get("status") for ch in c["checks"]]
        counts = f"{states.count('pass')}/{states.count('fail')}/{states.count('inconclusive')}"
        lines.append(f"{c['id']:>3}  {c['title']:<44} {c['verdict']:<14} {counts:>11} {c.get('seeds', 0):>5} "
                     f"{c.get('cpu_s', 0):>6.1f}s")
    lines.append("-" * 89)
    for c in results["claims"]:
        if c.get("verdict_reason"):
            lines.append(f"claim {c['id']} is inconclusive: {c['verdict_reason']}")
        for ch in c["checks"]:
            if ch.get("status") == "inconclusive" and c.get("verdict") != "inconclusive" and ch.get("open"):
                lines.append(f"claim {c['id']}, still open: {ch['check']} [{ch['open']}]")
    decided = sum(c["verdict"] in ("supported", "not supported", "mixed") for c in results["claims"])
    budget = results.get("budget_s")
    plan = (f"budget {budget:g} s, {results.get('modeled_s', 0):.0f} s modeled" if budget is not None
            else f"{len(results['seeds'])} seeds per arm (fixed design)")
    lines.append(
        f"{len(results['claims'])} claims, {decided} decided; {'quick' if results['quick'] else 'full'} run, "
        f"{plan}; {results['elapsed_s']:.0f} s wall, {results.get('cpu_s', 0):.0f} s CPU, "
        f"{results.get('jobs', 1)} process(es)"
    )
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, str):
        return html.escape(v)  # a censored value, "> 300"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        if len(v) > 12 or any(isinstance(x, list) for x in v):
            inner = ", ".join(_fmt(x) for x in v[:6])
            return f"[{inner}{', …' if len(v) > 6 else ''}] ({len(v)})"
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return html.escape(str(v))


def _means(metrics: dict[str, Any]) -> str:
    """The headline numbers: every ``name_mean`` with its ``name_std`` (spread over seeds)."""
    cells = []
    for key, value in metrics.items():
        if not key.endswith("_mean") or not isinstance(value, (int, float)):
            continue
        name = key[: -len("_mean")]
        spread = metrics.get(f"{name}_std")
        text = f"{value:.4g}" + (f" ± {spread:.2g}" if isinstance(spread, (int, float)) else "")
        cells.append(f"<tr><td>{html.escape(name)}</td><td>{text}</td></tr>")
    for key, value in metrics.items():  # means known only from below: censored runs
        if not key.endswith("_mean") or not isinstance(value, str):
            continue
        name = key[: -len("_mean")]
        text = html.escape(value) + " (censored: some seeds never got there)"
        cells.append(f"<tr><td>{html.escape(name)}</td><td>{text}</td></tr>")
    if not cells:
        return ""
    return f'<table class="metrics"><tr><th>mean over seeds</th><th>value ± std</th></tr>{"".join(cells)}</table>'


_CLASS = {"pass": "pass", "fail": "fail", "inconclusive": "undecided", "not evaluated": "skip"}


def _badge(verdict: str) -> str:
    return (
        f'<span class="badge" style="background:{VERDICT_COLORS.get(verdict, "#616161")}">'
        f"{html.escape(verdict)}</span>"
    )


def _image(out_dir: str, figure: str | None) -> str:
    if not figure:
        return "<p><em>no figure</em></p>"
    path = os.path.join(out_dir, figure)
    if not os.path.isfile(path):
        return "<p><em>figure missing</em></p>"
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img alt="{html.escape(figure)}" src="data:image/png;base64,{data}">'


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{margin-bottom:.2em} .meta{color:#666}
table{border-collapse:collapse;margin:1em 0} td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;
vertical-align:top} th{background:#f5f5f5}
.badge{color:#fff;border-radius:4px;padding:.1em .5em;font-size:.9em;white-space:nowrap}
section{border-top:2px solid #eee;margin-top:2em;padding-top:.5em}
img{max-width:100%;border:1px solid #eee} .anchor{color:#444;font-style:italic}
.metrics td:first-child{font-family:monospace} .pass{color:#2e7d32} .fail{color:#c62828} .skip{color:#616161}
.notes{color:#8a4b00} .undecided{color:#6a1b9a}
"""


def _design_text(results: dict[str, Any]) -> str:
    design = html.escape(str(results.get("design", "")))
    if results.get("budget_s") is None:
        return (f"<strong>Design:</strong> {design}, one look after {len(results.get('seeds', []))} seeds "
                "(<code>--seeds</code>).")
    looks = results.get("looks") or []
    return (f"<strong>Design:</strong> {design}. Seeds were added in groups, only to the claims with an undecided "
            f"check, at most {len(looks)} looks ({looks[-1] if looks else '?'} seeds); the bounds are widened at "
            "every look so that a check passes wrongly (or fails wrongly) with probability at most 5 % over all "
            "its looks together, and a decision once made is final. The seed plan comes from a cost model "
            f"(budget {results['budget_s']:g} s of modeled time), never from a clock, so a second run makes the "
            "same plan.")


def write_html(results: dict[str, Any], out_dir: str) -> str:
    rows = "".join(
        f"<tr><td>{c['id']}</td><td><a href='#claim{c['id']}'>{html.escape(c['title'])}</a></td>"
        f"<td>{html.escape(c['claim'])}</td><td>{_badge(c['verdict'])}</td></tr>"
        for c in results["claims"]
    )
    sections = []
    for c in results["claims"]:
        checks = "".join(
            f"<li class='{_CLASS.get(ch.get('status'), 'skip')}'>{html.escape(str(ch.get('status')))}"
            + (f" after {ch['seeds']} seeds" if ch.get("seeds") and ch.get("status") in ("pass", "fail") else "")
            + f": {html.escape(ch['check'])}"
            + (f"<br><small>{html.escape(ch['detail'])}</small>" if ch.get("detail") else "")
            + (f"<br><small><strong>Open:</strong> {html.escape(ch['open'])}</small>" if ch.get("open") else "")
            + "</li>"
            for ch in c["checks"]
        )
        by_part = c.get("seeds_by_part") or {}
        seeds = (f"<p class='meta'><strong>Seeds.</strong> {c.get('seeds', 0)} (looks: {c.get('looks', 0)}); per run: "
                 + html.escape(", ".join(f"{k} {v}" for k, v in by_part.items()))
                 + f"; CPU of its runs {c.get('cpu_s', 0):.1f} s, modeled {c.get('modeled_s', 0):.1f} s.</p>"
                 if by_part else "")
        reason = (f"<p class='notes'><strong>Why inconclusive.</strong> {html.escape(c['verdict_reason'])}</p>"
                  if c.get("verdict_reason") else "")
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in c.get("notes", []))
        metrics = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in c["metrics"].items()
        )
        sections.append(f"""
<section id="claim{c["id"]}">
<h2>{c["id"]}. {html.escape(c["title"])} {_badge(c["verdict"])}</h2>
<p><strong>Claim.</strong> {html.escape(c["claim"])}</p>
<p class="anchor"><strong>Paper.</strong> {html.escape(c["anchor"])}</p>
<p><strong>Setup.</strong> {html.escape(c.get("setup", ""))}</p>
<p><strong>Criterion (declared before the run).</strong> {html.escape(c["criterion"])}
<em>Test: {html.escape(c.get("test", ""))}.</em></p>
<ul>{checks}</ul>
{seeds}
{reason}
{f'<ul class="notes">{notes}</ul>' if notes else ""}
{_means(c["metrics"])}
{_image(out_dir, c.get("figure"))}
<details><summary>All measured numbers ({len(c["metrics"])}) — lists are per seed unless named otherwise;
CPU {c.get("cpu_s", 0):.1f} s</summary><table class="metrics">{metrics}</table></details>
</section>""")
    meta = " · ".join(
        html.escape(str(part))
        for part in (
            f"normkit {results['normkit_version']}",
            "quick run" if results["quick"] else "full run",
            (f"budget {results['budget_s']:g} s ({results.get('modeled_s', 0):.0f} s modeled)"
             if results.get("budget_s") is not None else f"{len(results['seeds'])} seeds (fixed design)"),
            f"{results['elapsed_s']:.0f} s wall, {results.get('cpu_s', 0):.0f} s CPU",
            f"data: {results.get('data', 'embedded')}",
            f"device {results.get('device', 'cpu')}",
        )
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>normkit lab: what Batch Normalization really does</title>
<style>{CSS}</style></head><body>
<h1>normkit lab: what Batch Normalization really does</h1>
<p class="meta">{meta}</p>
<p>Each claim was given a criterion in code before it ran; every check compares arms with one-sided bounds
on the mean over seeds of the paired (same-seed) differences, and passes or fails only when a bound clears its
margin — otherwise it is <em>inconclusive</em> (too little data; more seeds decide). {_design_text(results)}
The verdict is computed: <em>supported</em> (every check passed), <em>not supported</em> (every check
failed), <em>mixed</em> (some passed, some failed), <em>inconclusive</em> (an undecided check could still
change it), or <em>not evaluated</em> (no check could run, e.g. a layer missing from this build). Values
"&gt; N" are censored: not reached within the cap N. Numbers are means over seeds; bands and error bars
are one standard deviation over seeds, dots single seeds.</p>
<table><tr><th>#</th><th>claim</th><th>statement</th><th>verdict</th></tr>{rows}</table>
{"".join(sections)}
</body></html>"""
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path

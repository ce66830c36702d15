"""A stored run as one self-contained HTML page.

Everything is inside the file: CSS inline, plots as ``data:`` PNG images, no
script, no link to anything outside it (a Content-Security-Policy that allows
only inline styles and data: images says so to the browser too).  Per device:
the comparison table and the quality table (the same cells as the terminal
table, from ``results.report``), quality vs tg tokens/s vs size with the
Pareto front, the history of every rung over the model's earlier runs, and the
per-case eval detail.  Model output is untrusted: every piece of text goes
through ``html.escape``.
"""

from __future__ import annotations

import base64
import json
import time
from html import escape
from pathlib import Path
from typing import Any, Iterable

from edgequant.core.atomic import atomic_write_text
from edgequant.results import plots
from edgequant.results.pick import (check_quality_measure, higher_is_better, quality_description, quality_label,
                                    quality_score, rung_front)
from edgequant.results.report import (ENERGY_COLUMNS, SUSTAINED_COLUMNS, energy_cells, quality_caption, quality_cell,
                                      speed_caption, speed_cells, speed_columns, sustained_cells)
from edgequant.results.summary import (QUALITY_HEADERS, RunReport, energy_records, flip_counts, gates_of,
                                       kld_statistics, per_device, quality_columns, rung_record, summarize,
                                       sustained_records)
from edgequant.results.store import Store

HISTORY_RUNS = 30          # runs of the same model shown in the history plots
HISTORY_SCAN = 500         # most recent runs looked at to find them
MAX_OUTPUT_CHARS = 20_000  # per case; the rest is cut with a note

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2329; margin: 0 auto;
       max-width: 1500px; padding: 16px 28px 48px; background: #fff; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 18px; margin: 34px 0 6px; padding-top: 10px;
     border-top: 2px solid #d8dee4; } h3 { font-size: 15px; margin: 22px 0 6px; }
.meta, .caption, .note { color: #57606a; font-size: 12.5px; margin: 4px 0; }
.meta code { color: #24292f; }
nav { font-size: 13px; margin: 8px 0 0; } nav a { margin-right: 14px; color: #0b5cad; }
table { border-collapse: collapse; margin: 6px 0 4px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 9px; border-bottom: 1px solid #e3e7eb; vertical-align: top; }
th { background: #f3f5f7; text-align: right; font-weight: 600; white-space: nowrap; }
td { text-align: right; white-space: nowrap; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
tr.ref td { font-weight: 600; background: #f8fafc; } tr.bad td { color: #b42318; }
td.pass { color: #1a7f37; font-weight: 600; } td.fail { color: #b42318; font-weight: 600; }
img.plot { display: block; max-width: 100%; height: auto; border: 1px solid #e3e7eb; margin: 6px 0; }
details { margin: 6px 0; border: 1px solid #e3e7eb; border-radius: 4px; padding: 4px 10px; }
summary { cursor: pointer; font-weight: 600; }
table.cases td { white-space: normal; text-align: left; }
table.cases td.verdict { font-weight: 600; } table.cases tr.fail td.verdict { color: #b42318; }
pre { margin: 0; max-width: 760px; max-height: 260px; overflow: auto; white-space: pre-wrap;
      word-break: break-word; font: 12px/1.35 ui-monospace, "DejaVu Sans Mono", monospace;
      background: #f6f8fa; padding: 4px 6px; }
.fields { max-width: 360px; font-size: 12px; color: #3b434b; word-break: break-word; }
footer { margin-top: 30px; color: #57606a; font-size: 12.5px; }
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _device_title(rep: RunReport) -> str:
    d = rep.device or {}
    device_id = rep.rungs[0].device_id
    if d.get("kind") == "host":
        what = f"{d.get('cpu_model', '?')}, {d.get('physical_cores', '?')} cores, {d.get('os', '')}"
    else:
        what = " ".join(str(d[k]) for k in ("manufacturer", "model", "soc") if d.get(k)) or "device"
    return f"{device_id} · {what}"


# ---------------------------------------------------------------------------
# history over earlier runs of the same model


def history(store: Store, run: dict[str, Any], quality: str, limit: int = HISTORY_RUNS
            ) -> dict[str, dict[str, list[plots.HistoryPoint]]]:
    """device id -> rung -> tg t/s and quality score of each run of the same model up to this one."""
    runs = [r for r in store.runs(limit=HISTORY_SCAN)
            if r["model_id"] == run["model_id"] and r["started_at"] <= run["started_at"]]
    if all(r["run_id"] != run["run_id"] for r in runs):
        runs.append(run)
    runs = sorted(runs, key=lambda r: r["started_at"], reverse=True)[:limit]
    out: dict[str, dict[str, list[plots.HistoryPoint]]] = {}
    for r in runs:
        for dev in per_device(summarize(store, r["run_id"])):
            for rung in dev.rungs:
                tg, q = rung.get("tg_tps"), quality_score(rung, dev.rungs, quality)
                if tg is None and q is None:
                    continue
                out.setdefault(rung.device_id, {}).setdefault(rung.quant, []).append(
                    plots.HistoryPoint(r["started_at"], r["run_id"], tg, q))
    for series in out.values():
        for pts in series.values():
            pts.sort(key=lambda p: p.started_at)
    return out


# ---------------------------------------------------------------------------
# sections


def _table(headers: list[str], rows: Iterable[tuple[list[str], str, list[str]]], cls: str = "") -> str:
    """rows: (cells, row class, per-cell title attributes)."""
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    for cells, row_cls, titles in rows:
        tds = []
        for i, cell in enumerate(cells):
            title = titles[i] if i < len(titles) and titles[i] else ""
            attrs = (f' title="{_e(title)}"' if title else "")
            if cell == "PASS":
                attrs += ' class="pass"'
            elif cell.startswith("FAIL"):
                attrs += ' class="fail"'
            elif i == len(cells) - 1 and cls == "cmp":
                attrs += ' class="text"'
            tds.append(f"<td{attrs}>{_e(cell)}</td>")
        out.append(f'<tr class="{row_cls}">' + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _comparison(rep: RunReport) -> str:
    rows = []
    for rung in rep.rungs:
        rec = rung_record(rep, rung)
        cells = speed_cells(rec)
        titles = [""] * (len(cells) - 1) + [rung.detail or ""]          # the status cell explains itself
        for i, name in ((4, "pp_tps"), (5, "tg_tps")):                  # the speed cells: their stability
            titles[i] = _stability_title(rec, name, rung.metrics.get(name))
        rows.append((cells, "ref" if rung.is_reference else ("bad" if rung.status != "ok" else ""), titles))
    return f'<p class="caption">{_e(speed_caption(rep))}</p>' + _table(speed_columns(rep), rows, "cmp")


def _stability_title(rec: dict, name: str, stat) -> str:
    parts = []
    if rec.get(f"{name}_cv") is not None:
        parts.append(f"CV {100 * rec[f'{name}_cv']:.1f} %")
    if rec.get(f"{name}_min") is not None:
        parts.append(f"min {rec[f'{name}_min']:,.1f}, max {rec[f'{name}_max']:,.1f}")
    samples = ((stat.detail or {}).get("samples") if stat is not None else None) or []
    if samples:
        parts.append("samples " + ", ".join(f"{v:,.1f}" for v in samples))
    if rec.get("contention_cores") is not None:
        parts.append(f"other load {rec['contention_cores']:.2f} cores")
    return "; ".join(parts)
def _gate_text(g: dict) -> str:
    if g.get("kind") == "relative":
        return f"{g['gate']}: {g.get('label') or g.get('verdict')}"
    return f"{g['gate']}: {'pass' if g['pass'] else 'FAIL'} ({g['value']:.3f})"


def _gate_titles(rung, cols: list[str]) -> list[str]:
    titles = [""]
    gates = gates_of(rung)
    for m in cols:
        if m == "gates_pass":
            titles.append("; ".join(_gate_text(g) for g in gates if g["kind"] == "absolute"))
        elif m == "relative_gates":
            titles.append("; ".join(_gate_text(g) for g in gates if g["kind"] == "relative"))
        else:
            titles.append("; ".join(_gate_text(g) for g in gates if g["metric"] == m))
    return titles


def _quality(rep: RunReport) -> str:
    cols = quality_columns(rep)
    if not cols:
        return '<p class="note">No quality figures in this run (it ran with --no-quality).</p>'
    rows = [([rung.quant + (" (ref)" if rung.is_reference else "")] + [quality_cell(rung, m) for m in cols],
             "ref" if rung.is_reference else "", _gate_titles(rung, cols)) for rung in rep.rungs]
    gates = []
    for rung in rep.rungs:
        mine = gates_of(rung)
        failed = [g["gate"] for g in mine if g["kind"] == "absolute" and not g["pass"]]
        if failed:
            gates.append(f"{rung.quant}: fails the ship gates {', '.join(failed)}")
        for g in mine:
            if g["kind"] == "relative" and g.get("verdict") != "PASS":
                gates.append(f"{rung.quant}: {_gate_text(g)}")
    where = rep.quality_from or next((r.quality_device for r in rep.rungs if r.quality_device), None)
    if where:
        gates.insert(0, f"quality measured on {where} from the same GGUF files (it depends on the file, "
                        f"not on the device)")
    notes = "".join(f'<p class="note">{_e(g)}</p>' for g in gates)
    return (f'<p class="caption">{_e(quality_caption(rep))}</p>'
            + _table(["rung"] + [QUALITY_HEADERS[m] for m in cols], rows, "quality") + notes
            + _flips(rep) + _kld(rep))


def _flips(rep: RunReport) -> str:
    """Cases that went right -> wrong and wrong -> right against the reference, per metric."""
    counts = {r.quant: flip_counts(r) for r in rep.rungs if not r.is_reference}
    metrics = [m for m in QUALITY_HEADERS if any(m in c for c in counts.values())]
    if not metrics:
        return ""
    rows = [([quant] + [f"{c[m][0]} ↓ / {c[m][1]} ↑" if m in c else "—" for m in metrics], "", [])
            for quant, c in counts.items()]
    return ('<h4>flips against the reference</h4><p class="caption">cases right → wrong (↓) and wrong → right (↑) '
            'on the same prompts; "right" is the good outcome (for over-refusal: not refusing, for wrong %: not '
            'parsed-but-wrong). <code>edgequant report --cases RUNG --flips</code> lists them side by side.</p>'
            + _table(["rung"] + [QUALITY_HEADERS[m] for m in metrics], rows, "flips"))


def _kld(rep: RunReport) -> str:
    stats = {r.quant: kld_statistics(r) for r in rep.rungs if not r.is_reference}
    names = list(dict.fromkeys(k for st in stats.values() for k in st))
    if not names:
        return ""

    def cell(name: str, v: float | None) -> str:
        if v is None:
            return "—"
        return f"{100 * v:.3f} %" if name in ("RMS Δp", "Same top p") else f"{v:.6f}"

    rows = [([quant] + [cell(n, st.get(n)) for n in names], "", []) for quant, st in stats.items() if st]
    return ('<h4>token-level statistics (as llama-perplexity --kl-divergence prints them)</h4>'
            + _table(["rung"] + [" ".join(n.split()) for n in names], rows, "kld"))


def _pareto(rep: RunReport, quality: str) -> str:
    front = rung_front(rep.rungs, quality)
    pts = [plots.ParetoPoint(r.quant, r.get("tg_tps"), r.get("size"), quality_score(r, rep.rungs, quality),
                             f, r.is_reference)
           for r, f in zip(rep.rungs, front) if r.get("tg_tps") is not None]
    if not pts:
        return '<p class="note">No generation speed measured on this device: nothing to plot.</p>'
    label = quality_label(quality)
    png = plots.pareto_png(pts, _device_title(rep), label, higher_is_better(quality))
    on_front = ", ".join(p.quant for p in pts if p.on_front)
    if all(p.quality is None for p in pts):
        return (_img(png, f"size against generation tokens/s; Pareto front: {on_front}")
                + f'<p class="note">No {_e(label)} figures: Pareto front on speed and size alone (faster, '
                  f'smaller): {_e(on_front)}.</p>')
    return (_img(png, f"{label} against generation tokens/s; Pareto front: {on_front}")
            + f'<p class="note">Pareto front (better quality, faster, smaller; no rung beats these on all '
              f'three): {_e(on_front)}. Quality = {_e(quality_description(quality))}.</p>')


def _history(series: dict[str, list[plots.HistoryPoint]], rep: RunReport, quality: str) -> str:
    if not series:
        return '<p class="note">No history for this device.</p>'
    n_runs = len({p.run_id for pts in series.values() for p in pts})
    png = plots.history_png(series, f"{_device_title(rep)} · {n_runs} run(s) of {rep.run.get('model_id')}",
                            quality_label(quality), rep.run["run_id"])
    return (_img(png, f"tg tokens/s and {quality_label(quality)} of each rung over {n_runs} runs")
            + f'<p class="note">{n_runs} run(s) of this model on this device, oldest to newest '
              f'(up to the last {HISTORY_RUNS}).</p>')


def _cases(rep: RunReport, cases: list[dict[str, Any]]) -> str:
    # the eval runs on the host: a phone-only run keeps its cases under the host's id
    source = {rep.rungs[0].device_id} | {r.quality_device for r in rep.rungs if r.quality_device}
    by_rung: dict[str, list[dict]] = {}
    for c in cases:
        if c["device_id"] in source:
            by_rung.setdefault(c["quant"], []).append(c)
    if not by_rung:
        if rep.quality_from:
            return f'<p class="note">The eval cases are shown under {_e(rep.quality_from)}.</p>'
        return '<p class="note">No eval cases stored for this device.</p>'
    order = [r.quant for r in rep.rungs if r.quant in by_rung] + sorted(set(by_rung) - {r.quant for r in rep.rungs})
    out = []
    for quant in order:
        rows = by_rung[quant]
        flips = _case_flips(next((r for r in rep.rungs if r.quant == quant), None))
        n_ok = sum(1 for r in rows if r["ok"])
        n_ref = sum(1 for r in rows if r["refusal"])
        n_fail = sum(1 for r in rows if not r["ok"])
        body = []
        for r in rows:
            verdict = "refusal" if r["refusal"] else ("ok" if r["ok"] else "FAIL")
            why = r["reason"] if r["reason"] else json.dumps(r["fields"], ensure_ascii=False, sort_keys=True)
            text = r["output"]
            if len(text) > MAX_OUTPUT_CHARS:
                text = text[:MAX_OUTPUT_CHARS] + f"\n… ({len(r['output']) - MAX_OUTPUT_CHARS:,} more characters)"
            stop = f"{r['n_tokens']} tokens, stopped: {r['stopped']}" if r.get("n_tokens") is not None else ""
            flipped = "; ".join(flips.get(r["case_id"], []))
            body.append(f'<tr class="{"fail" if not r["ok"] else ""}"><td>{_e(r["case_id"])}</td>'
                        f'<td>{_e(r["format"])}</td><td class="verdict">{_e(verdict)}</td>'
                        f'<td class="fields">{_e(why)}</td><td><pre>{_e(text)}</pre>'
                        f'<span class="note">{_e(stop)}</span></td><td class="fields">{_e(flipped)}</td></tr>')
        out.append(f"<details><summary>{_e(quant)} · {n_ok}/{len(rows)} parsed · {n_fail} failed · "
                   f"{n_ref} refusal(s)</summary><table class=\"cases\"><thead><tr><th class=\"text\">case</th>"
                   f"<th class=\"text\">format</th><th class=\"text\">parse</th>"
                   f"<th class=\"text\">failure reason / parsed fields</th><th class=\"text\">raw output</th>"
                   f"<th class=\"text\">flips vs reference</th>"
                   f"</tr></thead><tbody>{''.join(body)}</tbody></table></details>")
    return "".join(out)


def _case_flips(rung) -> dict[str, list[str]]:
    """Case id -> the metrics on which it flipped against the reference (``metric ↓`` right -> wrong,
    ``metric ↑`` wrong -> right)."""
    out: dict[str, list[str]] = {}
    if rung is None:
        return out
    for m, s in rung.metrics.items():
        flips = (s.detail or {}).get("flips") or {}
        for direction, arrow in (("right_to_wrong", "↓"), ("wrong_to_right", "↑")):
            for cid in flips.get(direction, []):
                out.setdefault(cid, []).append(f"{QUALITY_HEADERS.get(m, m).replace(' %', '')} {arrow}")
    return out


# ---------------------------------------------------------------------------
# the page


def _energy_html(rep: RunReport) -> str:
    records = energy_records(rep)
    if not records:
        return ""
    return ("<h3>energy per generated token (phone battery)</h3>"
            + _table(ENERGY_COLUMNS, [(energy_cells(rec), "", []) for rec in records]))


def _sustained(rep: RunReport) -> str:
    """[sustained]: the table of the back-to-back runs and their curve (tg per run, temperature)."""
    records = sustained_records(rep)
    if not records:
        return ""
    rows = [(sustained_cells(rec), "", []) for rec in records]
    curves = {rec["quant"]: rec["runs"] for rec in records if rec["runs"]}
    out = "<h3>sustained: back-to-back generation runs, no cool-down</h3>" + _table(SUSTAINED_COLUMNS, rows)
    if curves:
        out += _img(plots.sustained_png(curves, rep.rungs[0].device_id),
                    "generation tokens/s of each back-to-back run, with the temperature after each")
    return out


def render_html(store: Store, run_id: str, quality: str = "quality", history_runs: int = HISTORY_RUNS) -> str:
    quality = check_quality_measure(quality)
    rep = summarize(store, run_id)
    run = rep.run
    devices = per_device(rep)
    hist = history(store, run, quality, history_runs)
    cases = store.eval_cases(run["run_id"])
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(run["started_at"]))
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>edgequant · run {_e(run['run_id'])}</title><style>{CSS}</style></head><body>",
             f"<h1>edgequant · {_e(run.get('model_id'))}</h1>",
             f'<p class="meta">run <code>{_e(run["run_id"])}</code> ({_e(run["status"])}'
             f'{": " + _e(run.get("status_detail")) if run.get("status_detail") else ""}) · profile '
             f'{_e(run.get("profile"))} · started {_e(started)} · edgequant {_e(run.get("edgequant_version"))} on '
             f'{_e(run.get("hostname"))}</p>',
             f'<p class="meta">command: <code>{_e(run.get("command"))}</code></p>']
    if not devices:
        parts.append('<p class="note">This run has no measured rungs.</p>')
    if len(devices) > 1:
        parts.append("<nav>" + "".join(f'<a href="#device-{i}">{_e(d.rungs[0].device_id)}</a>'
                                       for i, d in enumerate(devices, 1)) + "</nav>")
    for i, dev in enumerate(devices, 1):
        device_id = dev.rungs[0].device_id
        parts += [f'<section id="device-{i}"><h2>{_e(_device_title(dev))}</h2>',
                  "<h3>speed and memory against the reference</h3>", _comparison(dev),
                  _energy_html(dev), _sustained(dev),
                  "<h3>quality against the reference</h3>", _quality(dev),
                  f"<h3>{_e(quality_label(quality))} vs generation speed vs size</h3>", _pareto(dev, quality),
                  "<h3>history over runs</h3>", _history(hist.get(device_id, {}), dev, quality),
                  "<h3>per-case eval detail</h3>", _cases(dev, cases), "</section>"]
    parts.append("<footer>" + "".join(f"<p>* {_e(n)}</p>" for n in rep.footnotes)
                 + f"<p>made by edgequant {_e(run.get('edgequant_version'))} at "
                   f"{_e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))}</p></footer>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_html(store: Store, run_id: str, path: Path, quality: str = "quality") -> Path:
    atomic_write_text(path, render_html(store, run_id, quality))
    return path

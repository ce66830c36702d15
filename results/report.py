"""Render a stored run: a rich table, JSON, CSV or Markdown.

Rendering is separate from the records: ``edgequant.results.summary.summarize`` turns measurement rows
into one ``RungSummary`` per rung (reference first); the renderers here only format.  The cell
formatters (``speed_cells``, ``quality_cell``, ...) are shared with the HTML report.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from typing import Any

# the records, re-exported: callers that render a run read them from here too
from edgequant.results.summary import (KLD_DETAIL, QUALITY_HEADERS, RESOURCE_COLUMNS, UNSTABLE_CV,  # noqa: F401
                                       RungSummary,
                                       RunReport, Stat, energy_records, flipped_cases, gates_of, measured_speed,
                                       over_refusal_rose, per_device, quality_columns, quality_record,
                                       refusal_gain_from_over_refusal, resource_cells, rung_record, summarize,
                                       sustained_records)


# ---------------------------------------------------------------------------
# the columns, shared by every format


ENERGY_COLUMNS = ["rung", "device", "avg power W", "J/token", "tg t/s", "note"]


def energy_cells(rec: dict[str, Any]) -> list[str]:
    if rec["energy_not_measured"]:
        return [rec["quant"], rec["device_id"], "—", "not measured", fmt(rec["tg_tps"]), rec["energy_not_measured"]]
    return [rec["quant"], rec["device_id"], fmt(rec["avg_power_w"], 2), fmt(rec["energy_j_per_token"], 3),
            fmt(rec["tg_tps"]), "battery current x voltage during the last tg test"]


def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def pm(v: float | None, sd: float | None, digits: int = 1) -> str:
    if v is None:
        return "—"
    return f"{v:,.{digits}f} ± {sd:,.{digits}f}" if sd is not None else f"{v:,.{digits}f}"


def speed_columns(rep: RunReport) -> list[str]:
    n_p, n_g = rep.params.get("n_prompt", "?"), rep.params.get("n_gen", "?")
    return ["rung", "size MiB", "bits/w", "load s", f"pp{n_p} t/s", f"tg{n_g} t/s", "TTFT ms",
            "peak RSS MiB", "anon MiB", "pp ×", "tg ×", "size ×", "status"]


def _unstable(rec: dict[str, Any], name: str) -> str:
    cv = rec.get(f"{name}_cv")
    return " ~" if cv is not None and cv > UNSTABLE_CV else ""


def speed_cells(rec: dict[str, Any]) -> list[str]:
    name = rec["quant"] + (" (ref)" if rec["reference"] else "")
    status = rec["status"] + (", throttled" if rec.get("throttled") else "")
    return [name, fmt(rec["size_mib"]), fmt(rec["bits_per_weight"], 2), fmt(rec["load_s"], 2),
            pm(rec["pp_tps"], rec["pp_tps_sd"]) + _unstable(rec, "pp_tps"),
            pm(rec["tg_tps"], rec["tg_tps_sd"]) + _unstable(rec, "tg_tps"),
            pm(rec["ttft_ms"], rec["ttft_ms_sd"]), fmt(rec["peak_rss_mib"]), fmt(rec["peak_anon_mib"]),
            fmt(rec["pp_speedup"], 2), fmt(rec["tg_speedup"], 2), fmt(rec["size_ratio"], 3), status]


def _where(d: dict[str, Any]) -> str:
    if not d:
        return "?"
    if d.get("kind") in ("android", "linux"):
        os_name = f"Android {d.get('android_release')}" if d.get("kind") == "android" else "Linux"
        return (f"{d.get('cpu_model') or d.get('serial')} ({d.get('soc') or '?'}, {d.get('clusters') or '?'}, "
                f"{os_name}) via adb {d.get('serial')}, runner {d.get('runner') or 'prebuilt'}")
    return f"{d.get('cpu_model', d.get('model', '?'))}, {d.get('physical_cores', '?')} cores"


def speed_caption(rep: RunReport) -> str:
    d, p = rep.device, rep.params
    where = _where(d)
    return (f"run {rep.run['run_id']} ({rep.run['status']}) · model {rep.run.get('model_id')} · "
            f"{rep.runtime} {rep.runtime_version} on {where} · threads {p.get('threads', '?')}, "
            f"{p.get('repetitions', '?')} reps after {p.get('warmup', '?')} warm-up · mean ± sd")


# marks in a rate's cell, one per gate kind (the legend under the table says what each means)
ABSOLUTE_FAIL_MARK = "✗"
RELATIVE_MARKS = {"PASS": "✓", "FAIL": "▼", "INCONCLUSIVE": "?"}
QUALITY_LEGEND = ("rates in %, then rung − reference in pp (‡ = significant by a paired exact McNemar test, "
                  "p < 0.05; no ‡ does not mean no change: a small suite cannot show one) · "
                  "wrong % = parsed but with the wrong referral or ESI level (the app acts on it; lower is "
                  "better) · over-refusal % = in-scope cases answered with the refusal (lower is better) · "
                  "† = refusal % rose (or wrong % fell) only with over-refusal: the rung refuses in-scope cases "
                  "too, no improvement · "
                  f"{ABSOLUTE_FAIL_MARK} = fails its absolute (ship) gate · relative gates against the reference "
                  f"(non-inferiority, paired 95 % CI): {RELATIVE_MARKS['PASS']} PASS (no worse than the margin), "
                  f"{RELATIVE_MARKS['FAIL']} FAIL (worse by more than the margin), {RELATIVE_MARKS['INCONCLUSIVE']} "
                  f"INCONCLUSIVE (the suite is too small to tell; never a pass)")


OVER_REFUSAL_MARK = "†"


def _quality_table(g: RunReport, cols: list[str], caption: str | None, part: int, parts: int):
    from rich.table import Table

    title = "quality against the reference" + (f" ({part + 1}/{parts})" if parts > 1 else "")
    qt = Table(title=title, caption=caption, caption_justify="left")
    qt.add_column("rung", no_wrap=True)
    for m in cols:
        qt.add_column(QUALITY_HEADERS[m], justify="right", no_wrap=True)
    for rung in g.rungs:
        cells = [quality_cell(rung, m) for m in cols]
        style = "bold" if rung.is_reference else None
        qt.add_row(rung.quant + (" (ref)" if rung.is_reference else ""), *cells, style=style)
    return qt


def _gate_marks(rung: RungSummary, metric: str) -> str:
    marks = ""
    for g in gates_of(rung):
        if g["metric"] != metric:
            continue
        if g["kind"] == "absolute" and not g["pass"]:
            marks += ABSOLUTE_FAIL_MARK
        elif g["kind"] == "relative":
            marks += RELATIVE_MARKS.get(g.get("verdict"), "")
    return marks


def relative_notes(rep: RunReport) -> list[str]:
    """One line per rung whose relative gates did not all pass: which failed, which the suite could not
    tell, and how many cases would settle those at the observed rates."""
    out = []
    for rung in rep.rungs:
        rel = [g for g in gates_of(rung) if g["kind"] == "relative" and g.get("verdict") != "PASS"]
        if not rel:
            continue
        failed = [f"{g['metric']} ({100 * g['delta'] + 0.0:+.0f} pp)" for g in rel if g["verdict"] == "FAIL"]
        unsure = [f"{g['metric']} ({100 * g['delta'] + 0.0:+.0f} pp" + (f", ~{g['needed']} cases would tell)"
                                                                  if g.get("needed") else ")")
                  for g in rel if g["verdict"] == "INCONCLUSIVE"]
        parts = ([f"worse than the reference beyond the margin on {', '.join(failed)}"] if failed else []) + \
            ([f"cannot tell on {', '.join(unsure)}"] if unsure else [])
        out.append(f"{rung.quant} vs {rep.reference().quant if rep.reference() else 'the reference'}: "
                   + "; ".join(parts))
    return out


def quality_cell(rung: RungSummary, metric: str) -> str:
    s = rung.metrics.get(metric)
    if s is None:
        return "—"
    d = s.detail or {}
    if metric == "gates_pass":
        if s.value >= 1:
            return "PASS"
        failed = [g["gate"] for g in d.get("gates", []) if not g["pass"]]
        return "FAIL" + (f" ({len(failed)})" if failed else "")
    if metric == "relative_gates":
        verdict = d.get("verdict", "?")
        counted = [g for g in d.get("gates", []) if g.get("verdict") == verdict]
        return f"{verdict}" + (f" ({len(counted)})" if verdict != "PASS" and counted else "")
    if metric == "rms_dp":
        return f"{100 * s.value:.2f}"
    if metric == "mean_kld" or metric in KLD_DETAIL:
        return f"{s.value:.4f}"
    if metric == "differential_jaccard":
        return f"{s.value:.2f}"
    if metric == "eval_tg_tps":
        return f"{s.value:,.1f}"
    text = f"{s.value * 100:.0f}"
    if "delta_pp" in d and not rung.is_reference:
        text += f" {d['delta_pp']:+.0f}{'‡' if d.get('significant') else ''}"
        if metric == "refusal_compliance" and refusal_gain_from_over_refusal(rung):
            text += OVER_REFUSAL_MARK
        elif metric.endswith("_valid_but_wrong") and d["delta_pp"] < 0 and over_refusal_rose(rung):
            text += OVER_REFUSAL_MARK     # fewer wrong packets because fewer packets: no improvement either
    marks = _gate_marks(rung, metric)
    return text + (f" {marks}" if marks else "")


def quality_caption(rep: RunReport) -> str:
    q = rep.quality_params
    if q.get("where") == "device":   # edgequant run --quality-on-device
        where = (f" · measured on {rep.rungs[0].device_id} with {q.get('tool', 'llama-completion')}, "
                 f"the reference's outputs generated there too")
        token_level = " · KLD/top-1 not measured on the device (llama-completion returns text, not logits)"
    else:
        where, token_level = "", " · KLD/same top/RMS Δp against the reference's logits on its own outputs"
    return (f"suite {q.get('suite')} ({q.get('n_cases')} cases, {q.get('prompting')} prompting, greedy){where} · "
            + QUALITY_LEGEND + token_level)


def _quality_groups(rep: RunReport) -> list[tuple[RunReport, str | None]]:
    """The device groups whose quality table to show, each once per place it was measured."""
    out, seen = [], set()
    for g in per_device(rep):
        if not quality_columns(g):
            continue
        elsewhere = next((r.quality_device for r in g.rungs if r.quality_device), None)
        where = elsewhere or g.rungs[0].device_id
        if where in seen:
            continue
        seen.add(where)
        out.append((g, elsewhere))
    return out


def _measured_on(elsewhere: str | None) -> str:
    return f" · measured on {elsewhere} from the same GGUF bytes" if elsewhere else ""


SUSTAINED_COLUMNS = ["rung", "device", "runs", "first tg t/s", "last tg t/s", "drop %", "first run < 90 %",
                     "°C first → last", "thermal status", "CPU MHz first → last", "J/token first → last"]


def sustained_cells(rec: dict[str, Any]) -> list[str]:
    if rec.get("error"):
        return [rec["quant"], rec["device_id"], "0", "—", "—", "—", "—", "—", "—", "—",
                f"not measured: {rec['error']}"]
    runs = rec["runs"]

    def first_last(key, scale=1.0, digits=1):
        a, b = runs[0].get(key), runs[-1].get(key)
        if a is None or b is None:
            return "—"
        return f"{a / scale:.{digits}f} → {b / scale:.{digits}f}"

    return [rec["quant"], rec["device_id"], str(len(runs)), fmt(rec["first_tg_tps"]), fmt(rec["last_tg_tps"]),
            fmt(rec["drop_pct"]), "never" if rec["below90_run"] is None else f"run {rec['below90_run']}",
            first_last("celsius"), first_last("thermal_status", digits=0), first_last("cpu_khz", 1000.0, 0),
            sustained_energy_cell(rec)]


def sustained_energy_cell(rec: dict[str, Any]) -> str:
    joules = rec.get("energy_j_per_token")
    if not joules:
        return "—"
    if joules[0] is None or joules[-1] is None:
        return "not measured" + (" (charging)" if "charging" in (rec.get("energy_not_measured") or "") else "")
    return f"{joules[0]:.3f} → {joules[-1]:.3f}"


def render_table(rep: RunReport, console) -> None:
    from rich.measure import Measurement
    from rich.table import Table
    from rich.text import Text

    for g in filter(measured_speed, per_device(rep)):
        table = Table(title=f"edgequant · {rep.run.get('profile') or ''} · {g.rungs[0].device_id}",
                      caption=speed_caption(g), caption_justify="left")
        for i, col in enumerate(speed_columns(g)):
            table.add_column(col, justify="left" if i in (0, 12) else "right", no_wrap=i != 12)
        for rung in g.rungs:
            rec = rung_record(g, rung)
            style = "bold" if rung.is_reference else ("red" if rung.status not in ("ok", "noisy") else
                                                      "yellow" if rung.status == "noisy" else None)
            table.add_row(*speed_cells(rec), style=style)
        console.print(table)
    for g, elsewhere in _quality_groups(rep):
        caption = quality_caption(g) + _measured_on(elsewhere)
        parts = [quality_columns(g)]
        # a console too narrow for every column gets the table in parts, each with the rungs' names,
        # rather than figures cut down to "…"
        while True:
            tables = [_quality_table(g, cols, caption if i == len(parts) - 1 else None, i, len(parts))
                      for i, cols in enumerate(parts)]
            wide = console.options.update_width(10_000)   # the width each table wants, unclamped
            widest = max(Measurement.get(console, wide, t).maximum for t in tables)
            if widest <= console.width or max(len(c) for c in parts) <= 4:
                break
            parts = [half for cols in parts for half in (cols[:(len(cols) + 1) // 2], cols[(len(cols) + 1) // 2:])]
        for t in tables:
            console.print(t)
        for note in relative_notes(g):
            console.print(Text(f"↳ {note}", style="dim"))     # wrapped to the console's width
    energy = energy_records(rep)
    if energy:
        et = Table(title="energy per generated token (phone battery)")
        for i, col in enumerate(ENERGY_COLUMNS):
            et.add_column(col, justify="left" if i in (0, 1, 5) else "right")
        for rec in energy:
            et.add_row(*energy_cells(rec))
        console.print(et)
    sustained = sustained_records(rep)
    if sustained:
        st = Table(title="sustained: back-to-back generation runs, no cool-down", caption_justify="left",
                   caption="tg of each run; drop = first → last; temperatures and clock read after the first "
                           "and the last run")
        for i, col in enumerate(SUSTAINED_COLUMNS):
            st.add_column(col, justify="left" if i < 2 else "right")
        for rec in sustained:
            st.add_row(*sustained_cells(rec))
        console.print(st)
    if rep.resources:
        rt = Table(title="resources: peak RSS and time of each stage", caption_justify="left",
                   caption="peak RSS of the stage's own process (tree); a quantization's: its own memory above "
                           "what it shares with edgequant at fork; a phone's bench: read on the phone; push: "
                           "bytes sent; (cached): the build a reused artifact came from")
        for i, col in enumerate(RESOURCE_COLUMNS):     # folded on a narrow console, never cut short with "…"
            rt.add_column(col, justify="left" if i in (0, 1, 2, 6) else "right", overflow="fold")
        for r in rep.resources:
            rt.add_row(*resource_cells(r), style=None if r["status"] == "ok" else "red")
        console.print(rt)
    for note in rep.footnotes:
        # wrapped on a narrow console; a wide one (a pipe or file is rendered wide) keeps each note on one line,
        # whole for grep
        console.print(f"[dim]* {note}[/dim]", soft_wrap=console.width >= 120)


def render_markdown(rep: RunReport) -> str:
    lines: list[str] = []
    for g in filter(measured_speed, per_device(rep)):
        cols = speed_columns(g)
        lines += [f"**{speed_caption(g)}**", "", "| " + " | ".join(cols) + " |",
                  "|" + "|".join("---" if i in (0, 12) else "---:" for i in range(len(cols))) + "|"]
        for rung in g.rungs:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in speed_cells(rung_record(g, rung))) + " |")
        lines.append("")
    for g, elsewhere in _quality_groups(rep):
        cols = quality_columns(g)
        lines += [f"**{quality_caption(g)}{_measured_on(elsewhere)}**", "",
                  "| rung | " + " | ".join(QUALITY_HEADERS[m] for m in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for rung in g.rungs:
            lines.append(f"| {rung.quant}{' (ref)' if rung.is_reference else ''} | "
                         + " | ".join(quality_cell(rung, m) for m in cols) + " |")
        lines.append("")
        lines += [f"- {note}" for note in relative_notes(g)] + ([""] if relative_notes(g) else [])
    for title, cols, cells in (("energy per generated token (phone battery)", ENERGY_COLUMNS,
                                [energy_cells(r) for r in energy_records(rep)]),
                               ("sustained: back-to-back generation runs, no cool-down", SUSTAINED_COLUMNS,
                                [sustained_cells(r) for r in sustained_records(rep)]),
                               ("resources: peak RSS and time of each stage", RESOURCE_COLUMNS,
                                [resource_cells(r) for r in rep.resources])):
        if cells:
            lines += [f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells] + [""]
    lines += [f"\\* {n}\n" for n in rep.footnotes]
    return "\n".join(lines).rstrip("\n") + "\n"


def render_json(rep: RunReport) -> str:
    return json.dumps({
        "run": rep.run,
        "runtime": rep.runtime, "runtime_version": rep.runtime_version,
        "device": rep.device, "params": rep.params,
        "rungs": [rung_record(g, r) for g in per_device(rep) for r in g.rungs],
        "quality_params": rep.quality_params,
        "quality": [quality_record(r, quality_columns(rep)) for r in rep.rungs] if quality_columns(rep) else [],
        "metrics": {(r.quant if len(per_device(rep)) == 1 else f"{r.quant}@{r.device_id}"):
                    {k: asdict(v) for k, v in r.metrics.items()} for r in rep.rungs},
        "sustained": sustained_records(rep),
        "resources": rep.resources,
        "footnotes": rep.footnotes,
    }, indent=2, sort_keys=False)


def render_csv(rep: RunReport) -> str:
    buf = io.StringIO()
    qcols = quality_columns(rep)
    records = [{**rung_record(g, r), **{k: v for k, v in quality_record(r, qcols).items()
                                        if k not in ("quant", "reference", "gates") and not k.endswith("_ci95")
                                        and not isinstance(v, (dict, list))}}
               for g in per_device(rep) for r in g.rungs]
    fields = ["run_id"] + list(dict.fromkeys(k for rec in records for k in rec)) if records else ["run_id"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({"run_id": rep.run["run_id"], **rec})
    return buf.getvalue()


# ---------------------------------------------------------------------------
# flipped cases: a rung against the reference, case by case



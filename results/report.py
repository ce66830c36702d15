"""Render a stored run: a rich table, JSON, CSV or Markdown.

Rendering is separate from the records: ``summarize`` turns measurement rows
into one ``RungSummary`` per rung (reference first); the renderers only format.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from edgequant.results.store import Store

MiB = 1024 * 1024

# Shown under any table of the embedded default model (see README).
DEFAULT_MODEL_FOOTNOTE = (
    "Embedded default: its bf16 weights were dequantized from a Q4_K_M GGUF, so Q4_K rungs "
    "re-quantize them almost losslessly; do not read this model's ranking as a general one.")


@dataclass
class Stat:
    value: float
    stddev: float | None = None
    repetitions: int | None = None
    detail: dict | None = None


@dataclass
class RungSummary:
    quant: str
    is_reference: bool
    device_id: str
    status: str = "ok"
    detail: str | None = None
    metrics: dict[str, Stat] = field(default_factory=dict)

    def get(self, metric: str) -> float | None:
        s = self.metrics.get(metric)
        return None if s is None else s.value


@dataclass
class RunReport:
    run: dict[str, Any]
    rungs: list[RungSummary]
    params: dict[str, Any]
    device: dict[str, Any]
    runtime: str
    runtime_version: str
    footnotes: list[str]
    quality_params: dict[str, Any] = field(default_factory=dict)

    def reference(self) -> RungSummary | None:
        return next((r for r in self.rungs if r.is_reference), None)


def summarize(store: Store, run_id: str) -> RunReport:
    from edgequant.quantize.default_model import DEFAULT_MODEL_ID

    run = store.run(run_id)
    rows = store.measurements(run["run_id"])
    statuses = store.rung_statuses(run["run_id"])
    rungs: dict[tuple[str, str], RungSummary] = {}
    params: dict[str, Any] = {}
    quality_params: dict[str, Any] = {}
    device: dict[str, Any] = {}
    runtime = runtime_version = ""
    for r in rows:
        key = (r["quant"], r["device_id"])
        rung = rungs.setdefault(key, RungSummary(r["quant"], r["is_reference"], r["device_id"]))
        rung.metrics[r["metric"]] = Stat(r["value"], r["stddev"], r["repetitions"], r.get("detail"))
        if r["params"].get("stage") == "quality":
            quality_params = r["params"]
            continue
        params, device = r["params"], r["device"]
        runtime, runtime_version = r["runtime"], r["runtime_version"]
    for s in statuses:
        key = (s["quant"], s["device_id"])
        rung = rungs.setdefault(key, RungSummary(s["quant"], False, s["device_id"]))
        rung.status, rung.detail = s["status"], s["detail"]
    ordered = sorted(rungs.values(), key=lambda r: (not r.is_reference,))
    footnotes = [f"{r.quant}: {r.status}: {r.detail}" for r in ordered if r.status != "ok" and r.detail]
    if run["status"] != "complete":
        footnotes.insert(0, f"run is {run['status']}: {run.get('status_detail') or 'not finished'}")
    if run.get("model_id") == DEFAULT_MODEL_ID:
        footnotes.append(DEFAULT_MODEL_FOOTNOTE)
    return RunReport(run=run, rungs=ordered, params=params, device=device, runtime=runtime,
                     runtime_version=runtime_version, footnotes=footnotes, quality_params=quality_params)


# ---------------------------------------------------------------------------
# the columns, shared by every format


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def rung_record(rep: RunReport, rung: RungSummary) -> dict[str, Any]:
    """One flat record per rung: the numbers every renderer shows."""
    ref = rep.reference()
    m = rung.metrics

    def val(name, scale=1.0):
        s = m.get(name)
        return None if s is None else s.value / scale

    def sd(name, scale=1.0):
        s = m.get(name)
        return None if s is None or s.stddev is None else s.stddev / scale

    rec = {
        "quant": rung.quant,
        "reference": rung.is_reference,
        "status": rung.status,
        "detail": rung.detail,
        "size_mib": val("size", MiB),
        "bits_per_weight": val("bpw"),
        "load_s": val("load_time"),
        "pp_tps": val("pp_tps"),
        "pp_tps_sd": sd("pp_tps"),
        "tg_tps": val("tg_tps"),
        "tg_tps_sd": sd("tg_tps"),
        "ttft_ms": val("ttft"),
        "ttft_ms_sd": sd("ttft"),
        "peak_rss_mib": val("peak_rss", MiB),
        "peak_anon_mib": val("peak_rss_anon", MiB),
        "file_rss_mib": val("peak_rss_file", MiB),
        "repetitions": m["tg_tps"].repetitions if "tg_tps" in m else None,
        "pp_speedup": None,
        "tg_speedup": None,
        "size_ratio": None,
    }
    if ref is not None:
        rec["pp_speedup"] = _ratio(rung.get("pp_tps"), ref.get("pp_tps"))
        rec["tg_speedup"] = _ratio(rung.get("tg_tps"), ref.get("tg_tps"))
        rec["size_ratio"] = _ratio(rung.get("size"), ref.get("size"))
    return rec


def _fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def _pm(v: float | None, sd: float | None, digits: int = 1) -> str:
    if v is None:
        return "—"
    return f"{v:,.{digits}f} ± {sd:,.{digits}f}" if sd is not None else f"{v:,.{digits}f}"


def _columns(rep: RunReport) -> list[str]:
    n_p, n_g = rep.params.get("n_prompt", "?"), rep.params.get("n_gen", "?")
    return ["rung", "size MiB", "bits/w", "load s", f"pp{n_p} t/s", f"tg{n_g} t/s", "TTFT ms",
            "peak RSS MiB", "anon MiB", "pp ×", "tg ×", "size ×", "status"]


def _cells(rec: dict[str, Any]) -> list[str]:
    name = rec["quant"] + (" (ref)" if rec["reference"] else "")
    status = rec["status"]
    return [name, _fmt(rec["size_mib"]), _fmt(rec["bits_per_weight"], 2), _fmt(rec["load_s"], 2),
            _pm(rec["pp_tps"], rec["pp_tps_sd"]), _pm(rec["tg_tps"], rec["tg_tps_sd"]),
            _pm(rec["ttft_ms"], rec["ttft_ms_sd"]), _fmt(rec["peak_rss_mib"]), _fmt(rec["peak_anon_mib"]),
            _fmt(rec["pp_speedup"], 2), _fmt(rec["tg_speedup"], 2), _fmt(rec["size_ratio"], 3), status]


def _caption(rep: RunReport) -> str:
    d, p = rep.device, rep.params
    where = f"{d.get('cpu_model', d.get('model', '?'))}, {d.get('physical_cores', '?')} cores" if d else "?"
    return (f"run {rep.run['run_id']} ({rep.run['status']}) · model {rep.run.get('model_id')} · "
            f"{rep.runtime} {rep.runtime_version} on {where} · threads {p.get('threads', '?')}, "
            f"{p.get('repetitions', '?')} reps after {p.get('warmup', '?')} warm-up · mean ± sd")


QUALITY_RATES = ("xml_parse_rate", "array_parse_rate", "prose_parse_rate", "esi_parse_rate",
                 "refusal_compliance", "esi_exact", "esi_adjacent", "referral_accuracy",
                 "referral_agreement", "esi_agreement")
QUALITY_HEADERS = {"xml_parse_rate": "xml %", "array_parse_rate": "array %", "prose_parse_rate": "prose %",
                   "esi_parse_rate": "esi %", "refusal_compliance": "refusal %", "esi_exact": "ESI exact %",
                   "esi_adjacent": "ESI ±1 %", "referral_accuracy": "referral %",
                   "referral_agreement": "referral agr %", "esi_agreement": "ESI agr %",
                   "differential_jaccard": "ddx Jaccard", "mean_kld": "KLD", "p99_kld": "KLD p99",
                   "top1_agreement": "top-1 %", "eval_tg_tps": "eval t/s", "gates_pass": "gates"}


def quality_columns(rep: RunReport) -> list[str]:
    present = {m for r in rep.rungs for m in r.metrics}
    order = list(QUALITY_RATES) + ["differential_jaccard", "mean_kld", "p99_kld", "top1_agreement",
                                   "eval_tg_tps", "gates_pass"]
    return [m for m in order if m in present]


def quality_record(rung: RungSummary, columns: list[str]) -> dict[str, Any]:
    rec: dict[str, Any] = {"quant": rung.quant, "reference": rung.is_reference}
    for m in columns:
        s = rung.metrics.get(m)
        rec[m] = None if s is None else s.value
        d = (s.detail or {}) if s else {}
        if "delta_pp" in d:
            rec[f"{m}_delta_pp"] = d["delta_pp"]
            rec[f"{m}_p_value"] = d["p_value"]
            rec[f"{m}_significant"] = d["significant"]
        if "ci95" in d:
            rec[f"{m}_ci95"] = d["ci95"]
        if m == "gates_pass" and "gates" in d:
            rec["gates"] = d["gates"]
    return rec


def _quality_cell(rung: RungSummary, metric: str) -> str:
    s = rung.metrics.get(metric)
    if s is None:
        return "—"
    d = s.detail or {}
    if metric == "gates_pass":
        if s.value >= 1:
            return "PASS"
        failed = [g["gate"] for g in d.get("gates", []) if not g["pass"]]
        return "FAIL" + (f" ({len(failed)})" if failed else "")
    if metric in ("mean_kld", "p99_kld"):
        return f"{s.value:.4f}"
    if metric == "differential_jaccard":
        return f"{s.value:.2f}"
    if metric == "eval_tg_tps":
        return f"{s.value:,.1f}"
    text = f"{s.value * 100:.0f}"
    if "delta_pp" in d and not rung.is_reference:
        text += f" {d['delta_pp']:+.0f}{'‡' if d.get('significant') else ''}"
    return text


def _quality_caption(rep: RunReport) -> str:
    q = rep.quality_params
    return (f"suite {q.get('suite')} ({q.get('n_cases')} cases, {q.get('prompting')} prompting, greedy) · "
            f"rates in %, then rung − reference in pp; ‡ = significant by a paired exact McNemar test (p < 0.05), "
            f"otherwise within noise for the suite's size · KLD/top-1 against the reference's logits on its own "
            f"outputs")


def render_table(rep: RunReport, console) -> None:
    from rich.table import Table

    table = Table(title=f"edgequant · {rep.run.get('profile') or ''}", caption=_caption(rep),
                  caption_justify="left")
    for i, col in enumerate(_columns(rep)):
        table.add_column(col, justify="left" if i in (0, 12) else "right", no_wrap=i != 12)
    for rung in rep.rungs:
        rec = rung_record(rep, rung)
        style = "bold" if rung.is_reference else ("red" if rung.status != "ok" else None)
        table.add_row(*_cells(rec), style=style)
    console.print(table)
    cols = quality_columns(rep)
    if cols:
        qt = Table(title="quality against the reference", caption=_quality_caption(rep), caption_justify="left")
        qt.add_column("rung")
        for m in cols:
            qt.add_column(QUALITY_HEADERS[m], justify="right", no_wrap=True)
        for rung in rep.rungs:
            cells = [_quality_cell(rung, m) for m in cols]
            style = "bold" if rung.is_reference else None
            qt.add_row(rung.quant + (" (ref)" if rung.is_reference else ""), *cells, style=style)
        console.print(qt)
    for note in rep.footnotes:
        console.print(f"[dim]* {note}[/dim]", soft_wrap=True)


def render_markdown(rep: RunReport) -> str:
    cols = _columns(rep)
    lines = [f"**{_caption(rep)}**", "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" if i in (0, 12) else "---:" for i in range(len(cols))) + "|"]
    for rung in rep.rungs:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(rung_record(rep, rung))) + " |")
    cols = quality_columns(rep)
    if cols:
        lines += ["", f"**{_quality_caption(rep)}**", "",
                  "| rung | " + " | ".join(QUALITY_HEADERS[m] for m in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for rung in rep.rungs:
            lines.append(f"| {rung.quant}{' (ref)' if rung.is_reference else ''} | "
                         + " | ".join(_quality_cell(rung, m) for m in cols) + " |")
    lines += [f"\n\\* {n}" for n in rep.footnotes]
    return "\n".join(lines) + "\n"


def render_json(rep: RunReport) -> str:
    return json.dumps({
        "run": rep.run,
        "runtime": rep.runtime, "runtime_version": rep.runtime_version,
        "device": rep.device, "params": rep.params,
        "rungs": [rung_record(rep, r) for r in rep.rungs],
        "quality_params": rep.quality_params,
        "quality": [quality_record(r, quality_columns(rep)) for r in rep.rungs] if quality_columns(rep) else [],
        "metrics": {r.quant: {k: asdict(v) for k, v in r.metrics.items()} for r in rep.rungs},
        "footnotes": rep.footnotes,
    }, indent=2, sort_keys=False)


def render_csv(rep: RunReport) -> str:
    buf = io.StringIO()
    qcols = quality_columns(rep)
    records = [{**rung_record(rep, r), **{k: v for k, v in quality_record(r, qcols).items()
                                          if k not in ("quant", "reference", "gates") and not k.endswith("_ci95")}}
               for r in rep.rungs]
    fields = ["run_id"] + list(dict.fromkeys(k for rec in records for k in rec)) if records else ["run_id"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({"run_id": rep.run["run_id"], **rec})
    return buf.getvalue()

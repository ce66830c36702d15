"""Rendering an ``edgequant compare`` result (``edgequant.results.compare.Comparison``): the rich table with a
line per gate that did not pass, Markdown (a CI job summary), JSON (every figure and gate) and JUnit XML (one test
case per rung × device × gate)."""

from __future__ import annotations

import json
from dataclasses import asdict
from xml.etree import ElementTree as ET

from edgequant.results.compare import METRIC_ORDER, UNPAIRED_PARAMS, Comparison, Figure, GateResult, MiB

# the table: only the columns that differ


def _metric_order(names) -> list[str]:
    rank = {m: i for i, m in enumerate(METRIC_ORDER)}
    return sorted(names, key=lambda m: (rank.get(m, len(rank)), m))


def _fmt(v: float, unit: str) -> str:
    if unit == "bytes":
        return f"{v / MiB:,.1f} MiB"
    if unit == "ratio":
        return f"{100 * v:.1f} %"
    if unit == "bool":
        return "PASS" if v >= 1 else "FAIL"
    if abs(v) >= 100:
        return f"{v:,.1f}"
    return f"{v:.4g}"


def _delta(b: Figure, c: Figure) -> str:
    if b.unit == "ratio":
        return f"{100 * (c.value - b.value):+.1f} pp"
    if b.unit == "bool":
        return ""
    if b.value:
        return f"{100 * (c.value - b.value) / b.value:+.1f} %"
    return f"{c.value - b.value:+.3g}"


def changed_metrics(cmp: Comparison) -> list[str]:
    names = set()
    for p in cmp.pairs:
        for m in set(p.baseline) & set(p.candidate):
            if p.baseline[m].value != p.candidate[m].value:
                names.add(m)
    return _metric_order(names)


def table_rows(cmp: Comparison) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, cells and each row's verdict for the pair table (shared by the renderers)."""
    models = {p.model_id for p in cmp.pairs}
    devices = {p.device_id for p in cmp.pairs}
    stages = {p.stage for p in cmp.pairs}
    param_keys = sorted({k for p in cmp.pairs for k in p.params
                         if k not in UNPAIRED_PARAMS and k != "stage"
                         and len({json.dumps(q.params.get(k), sort_keys=True) for q in cmp.pairs
                                  if q.stage == p.stage}) > 1})
    identity_cols = sorted({k for p in cmp.pairs for k in p.identity})
    metrics = changed_metrics(cmp)
    headers = (["model"] if len(models) > 1 else []) + ["rung"] + (["device"] if len(devices) > 1 else []) \
        + (["stage"] if len(stages) > 1 else []) + param_keys + identity_cols + metrics + ["verdict"]
    by_pair: dict[tuple, list[GateResult]] = {}
    for r in cmp.results:
        by_pair.setdefault((r.model_id, r.quant, r.device_id), []).append(r)
    rows, verdicts = [], []
    for p in cmp.pairs:
        cells = ([p.model_id] if len(models) > 1 else []) + [p.quant] \
            + ([p.device_id] if len(devices) > 1 else []) + ([p.stage] if len(stages) > 1 else [])
        cells += [str(p.params.get(k, "—")) for k in param_keys]
        cells += [f"{p.identity[k][0]} → {p.identity[k][1]}" if k in p.identity else "=" for k in identity_cols]
        for m in metrics:
            b, c = p.baseline.get(m), p.candidate.get(m)
            if b is None or c is None:
                cells.append("—")
            elif b.value == c.value:
                cells.append("=")
            else:
                d = _delta(b, c)
                cells.append(f"{_fmt(b.value, b.unit)} → {_fmt(c.value, c.unit)}" + (f" ({d})" if d else ""))
        stage_gates = [r for r in by_pair.get((p.model_id, p.quant, p.device_id), [])
                       if r.status == "fail" and _gate_stage(r.gate) == p.stage]
        unsure = [r for r in by_pair.get((p.model_id, p.quant, p.device_id), [])
                  if r.status == "inconclusive" and _gate_stage(r.gate) == p.stage]
        if stage_gates:
            verdict = "REGRESSION: " + ", ".join(r.gate for r in stage_gates)
        elif p.noisy:
            verdict = f"noisy ({' and '.join(p.noisy)}): speed not judged"
        elif unsure:
            verdict = "INCONCLUSIVE: " + ", ".join(r.gate for r in unsure)
        else:
            verdict = "ok"
        cells.append(verdict)
        rows.append(cells)
        verdicts.append(verdict)
    return headers, rows, verdicts


def _gate_stage(gate: str) -> str:
    return "quality" if gate.startswith(("quality:", "suite:")) else "bench"


def _title(cmp: Comparison) -> str:
    b, c = cmp.baseline, cmp.candidate
    return f"compare baseline {b['run_id']} ({b['status']}) → candidate {c['run_id']} ({c['status']})"


def _unsure_why(cmp: Comparison) -> str:
    kinds = {r.gate.split(":")[0] for r in cmp.inconclusive}
    why = {"speed": "speed within the noise of two single runs: `compare --recheck` decides",
           "quality": "the suite is too small to tell"}
    return "; ".join(why.get(k, k) for k in sorted(kinds))


def _summary_line(cmp: Comparison) -> str:
    n = len(cmp.regressions)
    checked = sum(1 for r in cmp.results if r.status != "skip")
    unsure = len(cmp.inconclusive)
    tail = f"; {unsure} inconclusive ({_unsure_why(cmp)}; not a pass)" if unsure else ""
    return (f"{n} regression(s) in {checked} gate checks (gates: {cmp.gates.name}){tail}" if n
            else f"no regression in {checked} gate checks (gates: {cmp.gates.name}){tail}")


def render_table(cmp: Comparison, console) -> None:
    from rich.table import Table

    headers, rows, verdicts = table_rows(cmp)
    console.print(_title(cmp), highlight=False, soft_wrap=True)
    table = Table(caption="only the columns that differ; baseline → candidate (delta)", caption_justify="left")
    for h in headers:
        table.add_column(h, justify="left" if h in ("model", "rung", "device", "stage", "verdict") else "right")
    for cells, verdict in zip(rows, verdicts):
        table.add_row(*cells, style="red" if verdict.startswith("REGRESSION") else
                      "yellow" if verdict != "ok" else None)
    console.print(table)
    for r in cmp.results:
        if r.status in ("fail", "skip", "inconclusive"):
            style = "red" if r.status == "fail" else "yellow"
            console.print(f"[{style}]{r.status.upper()}[/{style}] {r.quant} on {r.device_id} · {r.gate}: "
                          f"{r.message}", soft_wrap=True, markup=True, highlight=False)
    console.print(("[red]" if cmp.regressions else "[green]") + _summary_line(cmp)
                  + ("[/red]" if cmp.regressions else "[/green]"))


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(cmp: Comparison) -> str:
    headers, rows, _ = table_rows(cmp)
    icon = "❌" if cmp.regressions else "✅"
    lines = [f"### {icon} edgequant: {_summary_line(cmp)}", "", f"{_title(cmp)}", "",
             "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    fails = [r for r in cmp.results if r.status == "fail"]
    if fails:
        lines += ["", "**Regressions**", ""]
        lines += [f"- `{r.quant}` on `{r.device_id}` · {r.gate}: {_md_cell(r.message)}" for r in fails]
    unsure = cmp.inconclusive
    if unsure:
        lines += ["", f"**Inconclusive** ({_unsure_why(cmp)}; not a pass)", ""]
        lines += [f"- `{r.quant}` on `{r.device_id}` · {r.gate}: {_md_cell(r.message)}" for r in unsure]
    skipped = [r for r in cmp.results if r.status == "skip"]
    if skipped:
        lines += ["", "**Not compared**", ""]
        lines += [f"- `{r.quant}` on `{r.device_id}` · {r.gate}: {_md_cell(r.message)}" for r in skipped]
    return "\n".join(lines) + "\n"


def render_json(cmp: Comparison) -> str:
    return json.dumps({
        "baseline": cmp.baseline, "candidate": cmp.candidate,
        "gates_profile": asdict(cmp.gates),
        "regression": bool(cmp.regressions),
        "inconclusive": len(cmp.inconclusive),
        "pairs": [{"model_id": p.model_id, "model_hash": p.model_hash, "quant": p.quant, "device_id": p.device_id,
                   "stage": p.stage, "params": p.params, "identity": p.identity,
                   "status": {"baseline": p.status[0], "candidate": p.status[1]}, "noisy": p.noisy,
                   "metrics": {m: {"baseline": asdict(p.baseline[m]), "candidate": asdict(p.candidate[m])}
                               for m in _metric_order(set(p.baseline) & set(p.candidate))}}
                  for p in cmp.pairs],
        "gates": [asdict(r) for r in cmp.results],
        "not_compared": cmp.unpaired,
    }, indent=2)


def render_junit(cmp: Comparison) -> str:
    """One test case per rung × device × gate; a regression is a <failure>, a gate not checked <skipped>."""
    suite = ET.Element("testsuite", name="edgequant compare", tests=str(len(cmp.results)),
                       failures=str(len(cmp.regressions)),
                       skipped=str(sum(1 for r in cmp.results if r.status in ("skip", "inconclusive"))),
                       errors="0")
    props = ET.SubElement(suite, "properties")
    for name, value in (("baseline", cmp.baseline["run_id"]), ("candidate", cmp.candidate["run_id"]),
                        ("gates", cmp.gates.name)):
        ET.SubElement(props, "property", name=name, value=str(value))
    for r in cmp.results:
        case = ET.SubElement(suite, "testcase", classname=f"{r.model_id}.{r.quant}.{r.device_id}", name=r.gate)
        if r.status == "fail":
            ET.SubElement(case, "failure", message=r.message, type="regression").text = r.message
        elif r.status == "skip":
            ET.SubElement(case, "skipped", message=r.message)
        elif r.status == "inconclusive":      # not a pass: reported as skipped, with why
            ET.SubElement(case, "skipped", message=f"INCONCLUSIVE: {r.message}")
        else:
            ET.SubElement(case, "system-out").text = r.message
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"

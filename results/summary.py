"""A stored run as records: one ``RungSummary`` per rung (reference first) and the flat records every
renderer shows (``rung_record``, ``quality_record``, energy and sustained records).

``edgequant.results.report`` only formats these (tables, Markdown, JSON, CSV); ``results/html.py`` too.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from typing import Any

from edgequant.bench.quality_stats import LLAMA_PERPLEXITY_NAMES
from edgequant.core.errors import BadInput
from edgequant.quantize.default_model import DEFAULT_MODEL_ID
from edgequant.results.store import Store


MiB = 1024 * 1024
# Shown under any table of the embedded default model (see README).
DEFAULT_MODEL_FOOTNOTE = (
    "Embedded default: its bf16 weights were dequantized from a Q4_K_M GGUF, so Q4_K rungs "
    "re-quantize them almost losslessly; do not read this model's ranking as a general one.")
# a speed figure whose repetitions vary more than this (coefficient of variation) is marked "~" in tables
UNSTABLE_CV = 0.05
UNSTABLE_NOTE = ("~ after a speed figure: its repetitions vary by more than 5 % (coefficient of variation); "
                 "CV, min and max of every rung are in the JSON and the HTML report")


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
    device: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # the bench stage's
    quality_device: str | None = None  # where the quality metrics were measured, when not on device_id

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
    quality_from: str | None = None  # per_device: the device whose quality figures these rungs share
    quality_params_by_device: dict[str, dict[str, Any]] = field(default_factory=dict)
    resources: list[dict[str, Any]] = field(default_factory=list)   # the run's stage_resources rows

    def reference(self) -> RungSummary | None:
        return next((r for r in self.rungs if r.is_reference), None)


def summarize(store: Store, run_id: str) -> RunReport:
    run = store.run(run_id)
    rows = store.measurements(run["run_id"])
    statuses = store.rung_statuses(run["run_id"])
    rungs: dict[tuple[str, str], RungSummary] = {}
    params: dict[str, Any] = {}
    quality_params: dict[str, Any] = {}
    quality_by_device: dict[str, dict[str, Any]] = {}
    device: dict[str, Any] = {}
    runtime = runtime_version = ""
    onnx_note = None
    for r in rows:
        key = (r["quant"], r["device_id"])
        rung = rungs.setdefault(key, RungSummary(r["quant"], r["is_reference"], r["device_id"]))
        if r["params"].get("stage") == "sustained" and "run" in r["params"]:
            continue     # one sustained run's energy: its figures are in the curve (sustained_tg_tps' detail)
        rung.metrics[r["metric"]] = Stat(r["value"], r["stddev"], r["repetitions"], r.get("detail"))
        rung.device = rung.device or r["device"]
        if r["stage"] in ("tune", "sustained"):   # tune's verdicts; [sustained]'s own runs
            continue
        if r["stage"] == "quality":
            quality_params = quality_by_device[r["device_id"]] = r["params"]
            continue
        rung.params, rung.device = r["params"], r["device"]
        if r["runtime"] == "onnxruntime":   # ONNX rungs: named in a footnote; the header describes the GGUF rows
            onnx_note = (f"ONNX-* rows: onnxruntime {r['runtime_version']}, "
                         f"{r['params'].get('execution_provider', 'CPUExecutionProvider')}, "
                         f"intra-op threads {r['params'].get('threads')}, inter-op 1")
            if runtime:
                continue
        params, device = r["params"], r["device"]
        runtime, runtime_version = r["runtime"], r["runtime_version"]
    for s in statuses:
        key = (s["quant"], s["device_id"])
        rung = rungs.setdefault(key, RungSummary(s["quant"], False, s["device_id"]))
        rung.status, rung.detail = s["status"], s["detail"]
    _join_quality_measured_elsewhere(rungs, {(s["quant"], s["device_id"]) for s in statuses})
    # the reference first; a rung with modifiers (Q4_K_M+imatrix, Q4_K_M+emb=Q8_0) next to its plain type
    # and a rung's variants (Q4_K_M@d512, Q4_K_M@kv=q8_0: edgequant.profiles.variants) after it
    first_of_base: dict[str, int] = {}
    for i, r in enumerate(rungs.values()):
        first_of_base.setdefault(_family(r.quant), i)
    ordered = sorted(rungs.values(), key=lambda r: (not r.is_reference, first_of_base[_family(r.quant)]))
    several = len({r.device_id for r in ordered}) > 1
    footnotes = [f"{r.quant}{' on ' + r.device_id if several else ''}: {r.status}: {r.detail}"
                 for r in ordered if r.detail and (r.status != "ok" or r.get("throttled"))]
    if any((_stability(r.metrics.get(m))["cv"] or 0.0) > UNSTABLE_CV for r in ordered for m in ("pp_tps", "tg_tps")):
        footnotes.append(UNSTABLE_NOTE)
    if run["status"] != "complete":
        footnotes.insert(0, f"run is {run['status']}: {run.get('status_detail') or 'not finished'}")
    if onnx_note:
        footnotes.append(onnx_note)
    if any(VARIANT_MARK in r.quant for r in ordered):
        footnotes.append(_variants_note(ordered))
    if run.get("model_id") == DEFAULT_MODEL_ID:
        footnotes.append(DEFAULT_MODEL_FOOTNOTE)
    return RunReport(run=run, rungs=ordered, params=params, device=device, runtime=runtime,
                     runtime_version=runtime_version, footnotes=footnotes, quality_params=quality_params,
                     quality_params_by_device=quality_by_device, resources=store.stage_resources(run["run_id"]))


RESOURCE_COLUMNS = ("stage", "rung", "place", "peak RSS MiB", "time s", "sent MiB", "status")


def resource_cells(r: dict[str, Any]) -> list[str]:
    """One stage row of the resources table: a reused artifact's build shows the time it was built in; a push
    to a phone the MiB it sent."""
    rss = "-" if r["peak_rss_bytes"] is None else f"{r['peak_rss_bytes'] / 2**20:,.0f}"
    secs = "-" if r["seconds"] is None else f"{r['seconds']:,.1f}"
    sent = "-" if r.get("data_bytes") is None else f"{r['data_bytes'] / 2**20:,.1f}"
    status = r["status"] + (" (cached)" if r["reused"] else "")
    return [r["stage"], r["quant"], r["device_id"], rss, secs, sent, status]


VARIANT_MARK = "@"   # edgequant.profiles.variants.SEPARATOR (results does not import profiles)


def _family(quant: str) -> str:
    return quant.split("+", 1)[0].split(VARIANT_MARK, 1)[0]


def _variants_note(rungs: list[RungSummary]) -> str:
    """What the variant names mean, with where each depth taken from the eval suite came from."""
    sources = {}
    for r in rungs:
        if r.params.get("depth_source"):
            sources[r.params["n_depth"]] = r.params["depth_source"]
    text = ("RUNG@dN: N tokens in the context before each pp/tg test (llama-bench -d; TTFT is the prefill of "
            "the pp prompt after them); @kv=T: K and V cache of type T (llama-bench -ctk/-ctv; flash attention "
            "on for a quantized V cache, which llama.cpp requires); one model load serves every variant, so "
            "load s is shown on the first; pp ×, tg × and size × compare with the reference's same variant")
    if sources:
        text += "; depths from the eval suite: " + ", ".join(f"d{d} = {src}" for d, src in sorted(sources.items()))
    return text


def _join_quality_measured_elsewhere(rungs: dict[tuple[str, str], RungSummary],
                                     benched: set[tuple[str, str]]) -> None:
    """A phone run computes quality on the host from the same GGUF bytes: those quality-only rungs
    join the phone rows of the same quant (remembering where they were measured) and leave the table."""
    for (quant, dev), q in list(rungs.items()):
        if q.params or (quant, dev) in benched:
            continue                      # this device benchmarked the rung itself
        targets = [r for (qq, d), r in rungs.items() if qq == quant and d != dev and (r.params or (qq, d) in benched)]
        if not targets:
            continue
        for r in targets:
            for name, stat in q.metrics.items():
                r.metrics.setdefault(name, stat)
            r.quality_device = dev
        del rungs[(quant, dev)]


def per_device(rep: RunReport) -> list[RunReport]:
    """One report per device of a run (in the order the devices first appear), each with its own
    reference rung, device facts and bench parameters.  A device without quality figures of its own
    (phones: the eval runs on the host) shares those of the device that has them, rung by rung."""
    groups: dict[str, list[RungSummary]] = {}
    for rung in rep.rungs:
        groups.setdefault(rung.device_id, []).append(rung)
    # quality depends on the GGUF, not on the device; eval throughput is the host's own and is not shared
    shared = set(QUALITY_HEADERS) - {"eval_tg_tps"}
    source: dict[str, RungSummary] = {}
    for rung in rep.rungs:
        if any(m in shared for m in rung.metrics):
            source.setdefault(rung.quant, rung)
    out = []
    for device_id, rungs in groups.items():
        quality_from = None
        if source and not any(m in shared for r in rungs for m in r.metrics):
            borrowed = []
            for r in rungs:
                src = source.get(r.quant)
                extra = {k: v for k, v in src.metrics.items() if k in shared} if src else {}
                borrowed.append(replace(r, metrics={**r.metrics, **extra}))
                quality_from = quality_from or (src.device_id if src else None)
            rungs = borrowed
        bench = next((r for r in rungs if r.params), None)
        out.append(RunReport(run=rep.run, rungs=rungs, params=bench.params if bench else rep.params,
                             device=next((r.device for r in rungs if r.device), rep.device),
                             runtime=rep.runtime, runtime_version=rep.runtime_version,
                             footnotes=rep.footnotes,
                             quality_params=rep.quality_params_by_device.get(quality_from or device_id,
                                                                             rep.quality_params),
                             quality_params_by_device=rep.quality_params_by_device,
                             quality_from=quality_from))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _reference_for(rep: RunReport, rung: RungSummary) -> RungSummary | None:
    """The reference rung in the same variant as ``rung`` (BF16@d512 for Q4_K_M@d512), else the reference."""
    ref = rep.reference()
    if ref is None or VARIANT_MARK not in rung.quant:
        return ref
    suffix = rung.quant[rung.quant.index(VARIANT_MARK):]
    same = ref.quant.split(VARIANT_MARK, 1)[0] + suffix
    return next((r for r in rep.rungs if r.quant == same and r.device_id == rung.device_id), None)


def _stability(s: Stat | None) -> dict[str, float | None]:
    """CV, min and max of a speed figure's repetitions (from its raw samples when the row kept them)."""
    if s is None:
        return {"cv": None, "min": None, "max": None}
    samples = (s.detail or {}).get("samples") or []
    if len(samples) > 1:
        mean = statistics.fmean(samples)
        return {"cv": statistics.stdev(samples) / mean if mean else None, "min": min(samples), "max": max(samples)}
    return {"cv": s.stddev / s.value if s.stddev is not None and s.value else None, "min": None, "max": None}


def rung_record(rep: RunReport, rung: RungSummary) -> dict[str, Any]:
    """One flat record per rung: the numbers every renderer shows."""
    ref = _reference_for(rep, rung)
    m = rung.metrics

    def val(name, scale=1.0):
        s = m.get(name)
        return None if s is None else s.value / scale

    def sd(name, scale=1.0):
        s = m.get(name)
        return None if s is None or s.stddev is None else s.stddev / scale

    rec = {
        "quant": rung.quant,
        "device_id": rung.device_id,
        "reference": rung.is_reference,
        "status": rung.status,
        "throttled": None if "throttled" not in m else bool(m["throttled"].value),
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
        # the variant (edgequant.profiles.variants): llama-bench's -d and -ctk/-ctv
        # energy on a phone (device.energy): over the last tg test; 0 with a reason when not measured
        "energy_j_per_token": _energy(m)[0],
        "avg_power_w": val("avg_power"),
        "energy_not_measured": _energy(m)[1],
        "n_depth": rung.params.get("n_depth", 0) if rung.params else None,
        "cache_type": rung.params.get("cache_type", "f16") if rung.params else None,
        **{f"{name}_{k}": v for name in ("pp_tps", "tg_tps") for k, v in _stability(m.get(name)).items()},
        "contention_cores": val("contention"),
        "pp_speedup": None,
        "tg_speedup": None,
        "size_ratio": None,
    }
    if ref is not None:
        rec["pp_speedup"] = _ratio(rung.get("pp_tps"), ref.get("pp_tps"))
        rec["tg_speedup"] = _ratio(rung.get("tg_tps"), ref.get("tg_tps"))
        rec["size_ratio"] = _ratio(rung.get("size"), ref.get("size"))
    return rec


def _energy(m: dict[str, Stat]) -> tuple[float | None, str | None]:
    """(joules per generated token, why it was not measured) of a rung's metrics."""
    s = m.get("energy_per_token")
    if s is None:
        return None, None
    reason = (s.detail or {}).get("not_measured")
    return (None, reason) if reason else (s.value, None)


def energy_records(rep: RunReport) -> list[dict[str, Any]]:
    out = []
    for g in per_device(rep):
        for r in g.rungs:
            rec = rung_record(g, r)
            if rec["energy_j_per_token"] is not None or rec["energy_not_measured"]:
                out.append(rec)
    return out


QUALITY_RATES = ("xml_parse_rate", "xml_valid_but_wrong", "array_parse_rate", "array_valid_but_wrong",
                 "prose_parse_rate", "prose_valid_but_wrong", "esi_parse_rate", "esi_valid_but_wrong",
                 "refusal_compliance", "over_refusal", "esi_exact", "esi_adjacent", "referral_accuracy",
                 "referral_agreement", "esi_agreement")
# rates where higher is worse (their change is read the other way round)
LOWER_IS_BETTER_RATES = frozenset({"over_refusal", "xml_valid_but_wrong", "array_valid_but_wrong",
                                   "prose_valid_but_wrong", "esi_valid_but_wrong"})
# token-level figures beside mean KLD, as llama-perplexity --kl-divergence names them (JSON and HTML)
KLD_DETAIL = ("median_kld", "p90_kld", "p95_kld", "p99_kld", "p999_kld", "max_kld", "rms_dp")
QUALITY_HEADERS = {"xml_parse_rate": "xml %", "array_parse_rate": "array %", "prose_parse_rate": "prose %",
                   "esi_parse_rate": "esi %", "xml_valid_but_wrong": "xml wrong %",
                   "array_valid_but_wrong": "array wrong %", "prose_valid_but_wrong": "prose wrong %",
                   "esi_valid_but_wrong": "esi wrong %", "refusal_compliance": "refusal %",
                   "over_refusal": "over-refusal %", "esi_exact": "ESI exact %",
                   "esi_adjacent": "ESI ±1 %", "referral_accuracy": "referral %",
                   "referral_agreement": "referral agr %", "esi_agreement": "ESI agr %",
                   "differential_jaccard": "ddx Jaccard", "mean_kld": "KLD", "p99_kld": "KLD p99",
                   "median_kld": "KLD median", "p90_kld": "KLD p90", "p95_kld": "KLD p95", "p999_kld": "KLD p99.9",
                   "max_kld": "KLD max", "rms_dp": "RMS Δp %",
                   "top1_agreement": "same top %", "eval_tg_tps": "eval t/s", "gates_pass": "ship gates",
                   "relative_gates": "relative gates"}


def over_refusal_rose(rung: RungSummary) -> bool:
    over = rung.metrics.get("over_refusal")
    return over is not None and (over.detail or {}).get("delta_pp", 0) > 0


def refusal_gain_from_over_refusal(rung: RungSummary) -> bool:
    """Whether a rise in refusal compliance came with a rise in over-refusal: a rung that refuses what it
    should answer too has not learned to refuse better (the default 270M from Q4_0 down refuses everything)."""
    rc, over = rung.metrics.get("refusal_compliance"), rung.metrics.get("over_refusal")
    if rc is None or over is None:
        return False
    return (rc.detail or {}).get("delta_pp", 0) > 0 and (over.detail or {}).get("delta_pp", 0) > 0


def quality_columns(rep: RunReport) -> list[str]:
    present = {m for r in rep.rungs for m in r.metrics}
    order = list(QUALITY_RATES) + ["differential_jaccard", "mean_kld", "p99_kld", "rms_dp", "top1_agreement",
                                   "eval_tg_tps", "gates_pass", "relative_gates"]
    return [m for m in order if m in present]


def flip_counts(rung: RungSummary) -> dict[str, tuple[int, int]]:
    """Per metric with a per-case outcome: (cases right -> wrong, cases wrong -> right) against the
    reference; "right" is the good outcome (not refusing an in-scope case, not valid-but-wrong)."""
    out = {}
    for m in QUALITY_RATES:
        s = rung.metrics.get(m)
        flips = (s.detail or {}).get("flips") if s is not None else None
        if flips is not None:
            out[m] = (len(flips["right_to_wrong"]), len(flips["wrong_to_right"]))
    return out


def kld_statistics(rung: RungSummary) -> dict[str, float]:
    """The token-level figures as llama-perplexity --kl-divergence names them ("Mean    KLD", ...)."""
    s = rung.metrics.get("mean_kld")
    named = dict((s.detail or {}).get("llama_perplexity", {})) if s is not None else {}
    if s is not None and not named:      # a run stored before the full statistics: what it has
        named = {LLAMA_PERPLEXITY_NAMES[m]: rung.metrics[m].value for m in ("mean_kld", "p99_kld")
                 if m in rung.metrics}
    if named and "top1_agreement" in rung.metrics and "Same top p" not in named:
        named["Same top p"] = rung.metrics["top1_agreement"].value
    return named


def gates_of(rung: RungSummary) -> list[dict]:
    """The rung's stored gate verdicts, both kinds, each with its ``kind`` (absolute or relative)."""
    out = []
    for row in ("gates_pass", "relative_gates"):
        s = rung.metrics.get(row)
        if s is not None and s.detail:
            out += [dict(g, kind=g.get("kind", "absolute")) for g in s.detail.get("gates", [])]
    return out


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
        if "flips" in d:
            rec[f"{m}_flips"] = {"right_to_wrong": len(d["flips"]["right_to_wrong"]),
                                 "wrong_to_right": len(d["flips"]["wrong_to_right"])}
        if m == "gates_pass" and "gates" in d:
            rec["gates"] = d["gates"]
        if m == "relative_gates" and "gates" in d:
            rec["relative_gates"] = d.get("verdict")
            rec["relative_gates_detail"] = d["gates"]
        if m == "mean_kld" and "llama_perplexity" in d:
            rec["kld_statistics"] = d["llama_perplexity"]
        if m == "refusal_compliance" and s is not None:
            rec["refusal_gain_from_over_refusal"] = refusal_gain_from_over_refusal(rung)
    for m in KLD_DETAIL:
        if m not in columns and m in rung.metrics:
            rec[m] = rung.metrics[m].value
    return rec


def measured_speed(g: RunReport) -> bool:
    """Whether a device group's speed table applies: it has bench rows, or nothing else to show (a run of
    only failed rungs still lists their statuses).  An eval run has quality figures only."""
    return any(r.params for r in g.rungs) or not quality_columns(g)


def sustained_record(rung: RungSummary) -> dict[str, Any] | None:
    """A rung's [sustained] figures (edgequant.bench.sustained), or None when it had no sustained runs."""
    s = rung.metrics.get("sustained_tg_tps")
    if s is None:
        failed = rung.metrics.get("sustained_runs")
        if failed is not None and failed.value == 0:
            return {"quant": rung.quant, "device_id": rung.device_id, "runs": [],
                    "error": (failed.detail or {}).get("error")}
        return None
    runs = (s.detail or {}).get("runs", [])
    below = rung.metrics.get("sustained_below90_run")
    energies = [r.get("energy") or {} for r in runs]
    return {"quant": rung.quant, "device_id": rung.device_id, "runs": runs,
            "first_tg_tps": rung.get("sustained_first_tg_tps"), "last_tg_tps": s.value,
            "drop_pct": rung.get("sustained_drop"),
            "below90_run": None if below is None or below.value == 0 else int(below.value),
            # a phone's energy per run (device.energy): J/token of each run, None where not measured
            "energy_j_per_token": [e.get("j_per_token") for e in energies] if any(energies) else None,
            "energy_not_measured": next((e["not_measured"] for e in energies if e.get("not_measured")), None)}


def sustained_records(rep: RunReport) -> list[dict[str, Any]]:
    return [rec for r in rep.rungs if (rec := sustained_record(r)) is not None]


def flipped_cases(store: Store, run_id: str, quant: str) -> dict[str, Any]:
    """The cases whose outcome differs between the reference and ``quant`` on some metric, with both
    outputs: ``{"run_id", "reference": ref quant, "rung": quant, "cases": [{"case_id", "format",
    "flips": [{"metric", "direction"}], "reference": case record, "rung": case record}]}``, cases in
    suite order.  Direction: ``right_to_wrong`` or ``wrong_to_right``."""
    run = store.run(run_id)
    rows = store.measurements(run["run_id"], stage="quality")
    mine = [r for r in rows if r["quant"] == quant]
    if not mine:
        known = sorted({r["quant"] for r in rows})
        raise BadInput(f"run {run['run_id']} has no quality figures for rung {quant}"
                       + (f"; rungs with quality figures: {', '.join(known)}" if known else
                          "; run it with the eval suite (without --no-quality)"))
    ref_rows = [r for r in rows if r["is_reference"]]
    if not ref_rows:
        raise BadInput(f"run {run['run_id']} has no quality figures for its reference rung; flips need both")
    ref_quant = ref_rows[0]["quant"]
    if mine[0]["is_reference"]:
        raise BadInput(f"{quant} is the reference rung of run {run['run_id']}: it has no flips against itself; "
                       f"name another rung")
    device = mine[0]["device_id"]
    flips: dict[str, list[dict[str, str]]] = {}
    for r in mine:
        if r["device_id"] != device or r["metric"] not in QUALITY_RATES:
            continue
        for direction, ids in ((r.get("detail") or {}).get("flips") or {}).items():
            for cid in ids:
                flips.setdefault(cid, []).append({"metric": r["metric"], "direction": direction})
    rung_cases = {c["case_id"]: c for c in store.eval_cases(run["run_id"], quant) if c["device_id"] == device}
    ref_cases = {c["case_id"]: c for c in store.eval_cases(run["run_id"], ref_quant) if c["device_id"] == device}
    out = []
    for cid, case in rung_cases.items():          # suite order
        if cid in flips:
            out.append({"case_id": cid, "format": case["format"], "flips": flips[cid],
                        "reference": ref_cases.get(cid), "rung": case})
    return {"run_id": run["run_id"], "reference": ref_quant, "rung": quant, "cases": out}

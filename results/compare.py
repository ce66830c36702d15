"""``edgequant compare BASELINE CANDIDATE``: pair two stored runs and apply the regression gates.

Rows pair on model (checkpoint hash), rung (quant), device and parameters
(``repetitions``/``warmup``/``timeout`` aside: they change the precision, not
the quantity).  Speed and quality rows of a rung carry different parameters,
so they pair separately.  The table shows only the columns that differ:
identity columns (model, device, parameters) when they vary between rows,
and a metric only when its value changed in at least one pair.

Gates (``edgequant.results.gates``): a speed drop that a one-sided Mann-Whitney
U test on both runs' raw samples calls significant and whose median drop is
beyond the practical threshold (the gates' percentage, raised to the place's
stored A/A noise floor where that is wider: a drop between the two is
inconclusive, for ``compare --recheck`` to decide); a rung stored ``noisy`` is
never judged, and samples too few for the test are reported as such.  Memory rise beyond a percentage and an
absolute amount, quality per-case outcomes judged by non-inferiority against
the baseline on the same cases (PASS, FAIL = regression, INCONCLUSIVE = the
suite cannot tell: shown, never a pass), an absolute suite gate going
PASS -> FAIL, and a baseline rung
or device missing (or failed) in the candidate.  Rendering (rich, Markdown, JSON, JUnit XML) lives in
``edgequant.results.compare_views``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from typing import Any

from edgequant.bench.quality import case_outcomes as one_case
from edgequant.bench.quality_stats import non_inferiority, paired_degradation
from edgequant.bench.stats import mann_whitney_greater
from edgequant.core.errors import BadInput
from edgequant.profiles.suite_records import LOWER_IS_BETTER
from edgequant.profiles.suites import load_suite
from edgequant.results.gates import Gates
from edgequant.results.store import Store

MiB = 1024 * 1024
# parameters that change a figure's precision, not what is measured
UNPAIRED_PARAMS = frozenset({"repetitions", "warmup", "timeout"})
# metric display order; others follow alphabetically
METRIC_ORDER = ("size", "bpw", "load_time", "pp_tps", "tg_tps", "ttft", "peak_rss", "peak_rss_anon",
                "peak_rss_file", "xml_parse_rate", "array_parse_rate", "prose_parse_rate", "esi_parse_rate",
                "refusal_compliance", "esi_exact", "esi_adjacent", "referral_accuracy", "referral_agreement",
                "esi_agreement", "differential_jaccard", "mean_kld", "p99_kld", "top1_agreement", "eval_tg_tps",
                "gates_pass")
SKIP_METRICS = frozenset({"n_params"})
NOISY = "noisy"            # a rung measured while other work loaded the machine (edgequant.noise)
MEASURED = ("ok", NOISY)   # statuses of a rung whose figures are stored


@dataclass
class Figure:
    value: float
    stddev: float | None
    unit: str
    detail: dict | None = None


@dataclass
class Pair:
    """One model × rung × device × parameters present in both runs."""

    model_id: str
    model_hash: str
    quant: str
    device_id: str
    stage: str
    params: dict[str, Any]
    baseline: dict[str, Figure]
    candidate: dict[str, Figure]
    identity: dict[str, tuple[str, str]] = field(default_factory=dict)  # artifact/runtime: baseline, candidate
    status: tuple[str, str] = ("ok", "ok")   # the rung's status in the baseline and in the candidate (noisy ...)
    artifacts: tuple[str, str] = ("", "")    # the full sha256 of the baseline's and the candidate's artifact

    @property
    def noisy(self) -> list[str]:
        return [side for side, st in zip(("baseline", "candidate"), self.status) if st == NOISY]


@dataclass
class GateResult:
    model_id: str
    quant: str
    device_id: str
    gate: str        # speed:tg_tps, memory:peak_rss, quality:xml_parse_rate, suite:<gate>, present
    status: str      # pass | fail | inconclusive | skip
    message: str
    baseline: float | None = None
    candidate: float | None = None


@dataclass
class Comparison:
    baseline: dict[str, Any]
    candidate: dict[str, Any]
    gates: Gates
    pairs: list[Pair]
    results: list[GateResult]
    unpaired: list[str]

    @property
    def regressions(self) -> list[GateResult]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def inconclusive(self) -> list[GateResult]:
        return [r for r in self.results if r.status == "inconclusive"]


# ---------------------------------------------------------------------------
# loading and pairing


def _params_key(params: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in params.items() if k not in UNPAIRED_PARAMS}, sort_keys=True)


def _groups(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    out: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r["metric"] in SKIP_METRICS:
            continue
        k = (r["model_hash"], r["quant"], r["device_id"], r["stage"], _params_key(r["params"]))
        g = out.setdefault(k, {"model_id": r["model_id"], "params": r["params"], "figures": {},
                               "artifact": r["artifact_sha256"], "runtime": f"{r['runtime']} {r['runtime_version']}"})
        g["figures"][r["metric"]] = Figure(r["value"], r["stddev"], r["unit"], r["detail"])
    return out


def _units(rows: list[dict[str, Any]], statuses: list[dict[str, Any]]) -> dict[tuple, tuple[str, str, str | None]]:
    """(model_hash, quant, device_id) -> (model_id, status, detail) of every rung a run touched."""
    out: dict[tuple, tuple[str, str, str | None]] = {}
    model = {}
    for r in rows:
        model[(r["quant"], r["device_id"])] = (r["model_hash"], r["model_id"])
        out.setdefault((r["model_hash"], r["quant"], r["device_id"]), (r["model_id"], "ok", None))
    for s in statuses:
        mh, mid = model.get((s["quant"], s["device_id"]), ("", ""))
        out[(mh, s["quant"], s["device_id"])] = (mid, s["status"], s["detail"])
    return out


def _param_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(k for k in set(a) | set(b) if k not in UNPAIRED_PARAMS and a.get(k) != b.get(k))
    return ", ".join(f"{k} {a.get(k)!r} → {b.get(k)!r}" for k in keys)


def compare_runs(store: Store, baseline: str, candidate: str, gates: Gates) -> Comparison:
    """Pair the two runs' rows and apply the gates; BadInput when no row pairs."""
    base_run, cand_run = store.run(baseline), store.run(candidate)
    b_rows, c_rows = store.measurements(base_run["run_id"]), store.measurements(cand_run["run_id"])
    if not b_rows:
        raise BadInput(f"baseline run {base_run['run_id']} has no stored measurements; pick another baseline")
    if not c_rows:
        raise BadInput(f"candidate run {cand_run['run_id']} has no stored measurements; nothing to compare")
    b_groups, c_groups = _groups(b_rows), _groups(c_rows)
    b_status = {(s["quant"], s["device_id"]): s["status"] for s in store.rung_statuses(base_run["run_id"])}
    c_status = {(s["quant"], s["device_id"]): s["status"] for s in store.rung_statuses(cand_run["run_id"])}
    pairs = []
    for k in sorted(set(b_groups) & set(c_groups), key=lambda k: (k[2], k[0], k[3], k[1])):
        b, c = b_groups[k], c_groups[k]
        identity = {}
        if b["artifact"] != c["artifact"]:
            identity["artifact"] = (b["artifact"][:12], c["artifact"][:12])
        if b["runtime"] != c["runtime"]:
            identity["runtime"] = (b["runtime"], c["runtime"])
        status = (b_status.get((k[1], k[2]), "ok"), c_status.get((k[1], k[2]), "ok"))
        pairs.append(Pair(b["model_id"], k[0], k[1], k[2], k[3], b["params"], b["figures"], c["figures"], identity,
                          status if k[3] == "bench" else ("ok", "ok"), (b["artifact"], c["artifact"])))
    if not pairs:
        hint = ""
        if b_groups and c_groups:
            bg, cg = next(iter(b_groups.items())), next(iter(c_groups.items()))
            if bg[0][0] != cg[0][0]:
                hint = f" (different models: {bg[1]['model_id']} vs {cg[1]['model_id']})"
            elif _param_diff(bg[1]["params"], cg[1]["params"]):
                hint = f" (parameters differ: {_param_diff(bg[1]['params'], cg[1]['params'])})"
        raise BadInput(f"no comparable rows: baseline {base_run['run_id']} and candidate {cand_run['run_id']} "
                       f"share no model × rung × device × parameters{hint}")
    b_cases = _cases_by_rung(store, base_run["run_id"])
    c_cases = _cases_by_rung(store, cand_run["run_id"])
    results: list[GateResult] = []
    floors = store.noise_floors()
    for p in pairs:
        results += _speed_memory_gates(p, gates, floors)
        if p.stage == "quality":
            results += _quality_gates(p, gates, b_cases.get((p.quant, p.device_id), {}),
                                      c_cases.get((p.quant, p.device_id), {}))
    unpaired = []
    b_units = _units(b_rows, store.rung_statuses(base_run["run_id"]))
    c_units = _units(c_rows, store.rung_statuses(cand_run["run_id"]))
    c_devices = {k[2] for k in c_units}
    for k, (model_id, status, _detail) in sorted(b_units.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        if status not in MEASURED:
            continue  # the baseline did not measure it either
        mh, quant, device_id = k
        if k not in c_units:
            why = (f"device {device_id} is missing in the candidate" if device_id not in c_devices
                   else f"rung {quant} on {device_id} is missing in the candidate")
            results.append(GateResult(model_id, quant, device_id, "present", "fail" if gates.missing else "skip", why))
            continue
        _mid, c_status, c_detail = c_units[k]
        if c_status not in MEASURED:
            results.append(GateResult(model_id, quant, device_id, "present", "fail" if gates.missing else "skip",
                                      f"rung {quant} on {device_id} {c_status} in the candidate"
                                      + (f": {c_detail}" if c_detail else "")))
            continue
        if not any(p.model_hash == mh and p.quant == quant and p.device_id == device_id for p in pairs):
            unpaired.append(f"{quant} on {device_id}: parameters differ")
            results.append(GateResult(model_id, quant, device_id, "present", "skip",
                                      "measured with other parameters in the candidate; not compared"))
            continue
        results.append(GateResult(model_id, quant, device_id, "present", "pass", "present in both runs"))
        # a stage the baseline measured (e.g. quality) that the candidate lacks or ran otherwise
        for gk, g in b_groups.items():
            if gk[:3] == (mh, quant, device_id) and gk not in c_groups:
                unpaired.append(f"{quant} on {device_id}: {gk[3]} rows not comparable")
                results.append(GateResult(model_id, quant, device_id, f"present:{gk[3]}", "skip",
                                          f"the candidate has no {gk[3]} rows with the baseline's parameters; "
                                          f"{gk[3]} not compared"))
    return Comparison(base_run, cand_run, gates, pairs, results, unpaired)


# ---------------------------------------------------------------------------
# gates


def samples_of(f: Figure) -> list[float] | None:
    """The raw per-repetition samples a row stored (host runs do), or None."""
    samples = (f.detail or {}).get("samples")
    if isinstance(samples, list) and samples and all(isinstance(v, (int, float)) for v in samples):
        return [float(v) for v in samples]
    return None


@dataclass(frozen=True)
class SpeedVerdict:
    """A speed figure judged on raw samples: ``status`` pass | fail | inconclusive (within a noise floor) | skip
    (too few samples)."""

    status: str
    message: str
    drop_pct: float
    p: float | None


def floor_for(floors: dict, device_id: str, quant: str, metric: str) -> dict | None:
    """The A/A noise floor that judges ``quant`` on ``device_id``: the rung's own latest floor, else the widest
    of the place's latest floors of other rungs (``edgequant noise --rung``), else None."""
    own = floors.get((device_id, quant, metric))
    if own is not None:
        return own
    others = [f for (dev, _q, m), f in floors.items() if dev == device_id and m == metric]
    return max(others, key=lambda f: f["floor_pct"]) if others else None


def speed_threshold(floor: dict | None, gates: Gates, device_id: str) -> tuple[float, str]:
    """The drop a speed figure must exceed to be called a regression, and where it comes from: the gates'
    percentage (what is worth a regression), raised to the place's A/A noise floor when that is wider (what
    one run against another cannot tell from chance)."""
    if floor is None:
        return gates.max_drop_pct, (f"gates; no A/A noise floor stored for {device_id}: `edgequant noise` "
                                    f"measures it")
    rung = f" ({floor['quant']})" if floor.get("quant") else ""
    if floor["floor_pct"] > gates.max_drop_pct:
        return floor["floor_pct"], f"A/A noise floor of {device_id}{rung}"
    return gates.max_drop_pct, f"gates; A/A noise floor of {device_id}{rung} {floor['floor_pct']:.3g} %"


def judge_speed(metric: str, unit: str, base: list[float], cand: list[float], threshold_pct: float,
                threshold_source: str, alpha: float, gate_pct: float | None = None) -> SpeedVerdict:
    """Regression when a one-sided Mann-Whitney U test says the candidate's samples are lower (p <= alpha)
    AND the median dropped by more than ``threshold_pct``; too few samples for the test to reach alpha: skip.
    A significant drop beyond ``gate_pct`` (the gates' percentage) but within a wider ``threshold_pct`` (a
    noise floor) is inconclusive: two runs cannot tell it from run-to-run noise, a re-check can."""
    mb, mc = statistics.median(base), statistics.median(cand)
    pct = 100.0 * (mb - mc) / mb if mb else 0.0
    head = f"{metric} median {mb:,.2f} → {mc:,.2f} {unit} ({-pct:+.1f} %)"
    test = mann_whitney_greater(base, cand)
    if test.min_p > alpha:
        return SpeedVerdict("skip", f"{head}: too few samples to judge ({len(base)} vs {len(cand)}: a rank test "
                                    f"cannot reach p ≤ {alpha:g}); measure with more repetitions", pct, None)
    tail = (f"Mann-Whitney p = {test.p:.3g} on {len(base)} vs {len(cand)} samples; limit −{threshold_pct:.3g} % "
            f"({threshold_source}) and p ≤ {alpha:g}")
    if test.p <= alpha and pct > threshold_pct:
        return SpeedVerdict("fail", f"{head}, {tail}", pct, test.p)
    if test.p <= alpha and gate_pct is not None and gate_pct < pct <= threshold_pct:
        return SpeedVerdict("inconclusive", f"{head}, {tail}: beyond the gates' −{gate_pct:.3g} % but within the "
                                            f"noise of two single runs; `compare --recheck` measures both "
                                            f"alternately and decides", pct, test.p)
    return SpeedVerdict("pass", f"{head}, {tail}", pct, test.p)


def _speed_memory_gates(p: Pair, g: Gates, floors: dict | None = None) -> list[GateResult]:
    out = []
    for metric in g.speed_metrics:
        b, c = p.baseline.get(metric), p.candidate.get(metric)
        if b is None or c is None:
            continue
        gate = f"speed:{metric}"
        if p.noisy:
            out.append(GateResult(p.model_id, p.quant, p.device_id, gate, "skip",
                                  f"{metric} {b.value:,.2f} → {c.value:,.2f} {b.unit}: not judged: the "
                                  f"{' and the '.join(p.noisy)} measured it while other work loaded the machine "
                                  f"(status noisy)", b.value, c.value))
            continue
        threshold, source = speed_threshold(floor_for(floors or {}, p.device_id, p.quant, metric), g, p.device_id)
        bs, cs = samples_of(b), samples_of(c)
        if bs is not None and cs is not None:
            v = judge_speed(metric, b.unit, bs, cs, threshold, source, g.speed_alpha, gate_pct=g.max_drop_pct)
            out.append(GateResult(p.model_id, p.quant, p.device_id, gate, v.status, v.message, b.value, c.value))
            continue
        # rows without raw samples (older runs, phones before samples were stored): the means and stddevs
        drop = b.value - c.value
        pct = 100.0 * drop / b.value if b.value else 0.0
        noise = g.noise_factor * ((b.stddev or 0.0) + (c.stddev or 0.0))
        failed = pct > threshold and drop > noise
        msg = (f"{metric} {b.value:,.2f} → {c.value:,.2f} {b.unit} ({-pct:+.1f} %, noise ±{noise:,.2f}; "
               f"limit −{threshold:.3g} % ({source}) and beyond the noise; no raw samples: judged on mean ± sd)")
        out.append(GateResult(p.model_id, p.quant, p.device_id, gate, "fail" if failed else "pass",
                              msg, b.value, c.value))
    for metric in g.memory_metrics:
        b, c = p.baseline.get(metric), p.candidate.get(metric)
        if b is None or c is None:
            continue
        rise = c.value - b.value
        pct = 100.0 * rise / b.value if b.value else (0.0 if rise <= 0 else float("inf"))
        scale, unit = (MiB, "MiB") if b.unit == "bytes" else (1.0, b.unit)
        failed = pct > g.max_rise_pct and rise > g.max_rise_mib * scale
        msg = (f"{metric} {b.value / scale:,.1f} → {c.value / scale:,.1f} {unit} ({pct:+.1f} %, "
               f"{rise / scale:+,.1f} {unit}; limit +{g.max_rise_pct:g} % and +{g.max_rise_mib:g} MiB)")
        out.append(GateResult(p.model_id, p.quant, p.device_id, f"memory:{metric}", "fail" if failed else "pass",
                              msg, b.value, c.value))
    return out


def _cases_by_rung(store: Store, run_id: str) -> dict[tuple[str, str], dict[str, dict]]:
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for c in store.eval_cases(run_id):
        out.setdefault((c["quant"], c["device_id"]), {})[c["case_id"]] = c
    return out


def _suite_for(params: dict[str, Any]):
    """The suite whose gold labels judge the cases, if it is loadable and unchanged (same sha256)."""
    name = params.get("suite")
    if not name:
        return None
    try:
        suite = load_suite(name)
    except Exception:  # noqa: BLE001 - a suite that no longer loads: fall back to gold-free outcomes
        return None
    return suite if getattr(suite, "sha256", None) == params.get("suite_sha256") else None


def case_outcomes(cases: dict[str, dict], suite) -> dict[str, dict[str, bool]]:
    """Per metric, per case id: was this case right?  With the suite's gold labels, the quality stage's
    outcomes (``bench.quality.case_outcomes``; for over-refusal and valid-but-wrong "right" is the good
    outcome: not refusing, not parsed-but-wrong); without them, a case is right when its output parsed."""
    out: dict[str, dict[str, bool]] = {}
    if suite is None:
        for cid, r in cases.items():
            out.setdefault(f"{r['format']}_parse_rate", {})[cid] = bool(r["ok"] or r["refusal"])
        return out
    for case in suite.cases:
        r = cases.get(case.id)
        if r is None:
            continue
        for metric, hit in one_case(case, bool(r["ok"]), bool(r["refusal"]), r["fields"] or {}).items():
            out.setdefault(metric, {})[case.id] = hit != (metric in LOWER_IS_BETTER)
    return out


def _quality_gates(p: Pair, g: Gates, b_cases: dict[str, dict], c_cases: dict[str, dict]) -> list[GateResult]:
    out = []
    if b_cases and c_cases:
        suite = _suite_for(p.params)
        b_out, c_out = case_outcomes(b_cases, suite), case_outcomes(c_cases, suite)
        for metric in sorted(set(b_out) & set(c_out)):
            ids = sorted(set(b_out[metric]) & set(c_out[metric]))
            if not ids:
                continue
            base, cand = [b_out[metric][i] for i in ids], [c_out[metric][i] for i in ids]
            d = paired_degradation(base, cand, g.alpha)
            ni = non_inferiority(base, cand, g.margin)
            rb = sum(base) / len(ids)
            rc = sum(cand) / len(ids)
            what = "right" if metric.endswith(("_valid_but_wrong", "over_refusal")) else ""
            msg = (f"{metric} {what + ' ' if what else ''}{100 * rb:.1f} % → {100 * rc:.1f} % on {len(ids)} paired "
                   f"cases: non-inferiority {ni.label}; McNemar b={d.b} c={d.c} ({d.label})")
            status = {"PASS": "pass", "FAIL": "fail", "INCONCLUSIVE": "inconclusive"}[ni.verdict]
            out.append(GateResult(p.model_id, p.quant, p.device_id, f"quality:{metric}", status, msg, rb, rc))
    if g.suite_gates:
        bg, cg = p.baseline.get("gates_pass"), p.candidate.get("gates_pass")
        if bg is not None and cg is not None:
            c_by_name = {x["gate"]: x for x in (cg.detail or {}).get("gates", [])}
            for gate in (bg.detail or {}).get("gates", []):
                other = c_by_name.get(gate["gate"])
                if other is None:
                    continue
                failed = bool(gate["pass"]) and not other["pass"]
                word = {True: "PASS", False: "FAIL"}
                msg = (f"{gate['gate']}: {word[bool(gate['pass'])]} → {word[bool(other['pass'])]} "
                       f"({gate['value']:.3g} → {other['value']:.3g})")
                out.append(GateResult(p.model_id, p.quant, p.device_id, f"suite:{gate['gate']}",
                                      "fail" if failed else "pass", msg, gate["value"], other["value"]))
    return out

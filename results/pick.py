"""Pick a quant: the best rung of a stored run that meets every constraint on one device.

Constraints are thresholds on stored metrics (``tg_tps >= 10``, ``peak_rss <= 3 GiB``) and the
suite-style quality gates (``xml_parse_rate >= 0.95``, parsed by ``profiles.suites.parse_gate``).
Among the rungs that meet all of them the best one has the smallest quality loss against the
reference rung (a gain counts as no loss), then the fastest generation.  Every excluded rung
says which constraints excluded it and by how much; when none qualifies, the rung closest to
qualifying and the constraint it misses (relative distance) are named.

Quality is one number per rung (``QUALITY_MEASURES`` or a single stored metric): the Pareto
front over (quality, tg t/s, size) is shared with the HTML report's plots.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from edgequant.core.errors import BadInput
from edgequant.profiles.suite_records import Gate
from edgequant.profiles.suites import parse_gate
from edgequant.results.store import Store
from edgequant.results.summary import (LOWER_IS_BETTER_RATES, QUALITY_HEADERS, QUALITY_RATES, RunReport, RungSummary,
                                       per_device, summarize)
from edgequant.bench.tune import relative_margin

# ---------------------------------------------------------------------------
# quality as one number per rung

# What the reference scores against itself on the metrics that compare a rung with the reference:
# it is not measured (the eval skips it), but it is exact by definition.
REFERENCE_IDENTITY = {"referral_agreement": 1.0, "esi_agreement": 1.0, "differential_jaccard": 1.0,
                      "top1_agreement": 1.0, "mean_kld": 0.0, "p99_kld": 0.0}
LOWER_IS_BETTER = frozenset({"mean_kld", "p99_kld"}) | LOWER_IS_BETTER_RATES
SINGLE_METRICS = QUALITY_RATES + ("differential_jaccard", "top1_agreement", "mean_kld", "p99_kld")

# name -> (label, which stored metrics it averages); a single stored metric is a measure of its own.
QUALITY_MEASURES: dict[str, tuple[str, Callable[[str], bool]]] = {
    "quality": ("mean of every rate the suite measured (parse rates, gold accuracy, agreement with the "
                "reference, which agrees with itself; over-refusal and valid-but-wrong counted as 1 − rate)",
                lambda m: m in QUALITY_RATES),
    "parse_rate": ("mean parse rate over the formats", lambda m: m.endswith("_parse_rate")),
}


def check_quality_measure(name: str) -> str:
    if name in QUALITY_MEASURES or name in SINGLE_METRICS:
        return name
    raise BadInput(f"quality measure {name!r} is not known; use one of "
                   f"{', '.join(list(QUALITY_MEASURES) + list(SINGLE_METRICS))}")


def quality_label(name: str) -> str:
    if name in QUALITY_MEASURES:
        return name.replace("_", " ")
    return QUALITY_HEADERS.get(name, name).replace(" %", "") + (" (lower is better)" if name in LOWER_IS_BETTER
                                                                 else "")


def quality_description(name: str) -> str:
    if name in QUALITY_MEASURES:
        return f"{name}, the {QUALITY_MEASURES[name][0]}"
    return quality_label(name)


def higher_is_better(name: str) -> bool:
    return name not in LOWER_IS_BETTER


def _value(rung: RungSummary, metric: str) -> float | None:
    v = rung.get(metric)
    return None if v is None or math.isnan(v) else float(v)


def quality_values(rung: RungSummary, group: list[RungSummary]) -> dict[str, float]:
    """The rung's quality figures; the reference gets its exact self-agreement on the metrics that the
    other rungs of its group were compared on."""
    names = set(SINGLE_METRICS)
    out = {m: v for m in names if (v := _value(rung, m)) is not None}
    if rung.is_reference and out:
        for m, ideal in REFERENCE_IDENTITY.items():
            if m not in out and any(m in r.metrics for r in group if r is not rung):
                out[m] = ideal
    return out


def _measure_metrics(name: str, values: dict[str, float]) -> list[str]:
    if name in QUALITY_MEASURES:
        keep = QUALITY_MEASURES[name][1]
        return sorted(m for m in values if keep(m))
    return [name] if name in values else []


def _oriented(values: dict[str, float], name: str, m: str) -> float:
    """A rate inside a mean of rates: a lower-is-better rate (over-refusal) counts as 1 − rate."""
    return 1.0 - values[m] if name in QUALITY_MEASURES and m in LOWER_IS_BETTER_RATES else values[m]


def quality_score(rung: RungSummary, group: list[RungSummary], name: str) -> float | None:
    values = quality_values(rung, group)
    used = _measure_metrics(name, values)
    return sum(_oriented(values, name, m) for m in used) / len(used) if used else None


def quality_loss(rung: RungSummary, ref: RungSummary | None, group: list[RungSummary], name: str) -> float | None:
    """How much worse than the reference, on the metrics both have (0 = none; a gain counts as 0)."""
    if ref is None:
        return None
    mine, theirs = quality_values(rung, group), quality_values(ref, group)
    common = [m for m in _measure_metrics(name, mine) if m in theirs]
    if not common:
        return None
    sign = 1.0 if higher_is_better(name) else -1.0
    loss = sign * sum(_oriented(theirs, name, m) - _oriented(mine, name, m) for m in common) / len(common)
    return max(0.0, round(loss, 12))


# ---------------------------------------------------------------------------
# Pareto front


def pareto_front(points: list[tuple[float, ...]]) -> list[bool]:
    """Which points no other point dominates; every coordinate is to be maximized."""
    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [not any(dominates(q, p) for q in points if q is not p) for p in points]


def rung_front(group: list[RungSummary], quality: str) -> list[bool]:
    """Which rungs of a device are Pareto-optimal on (quality, tg t/s, size): better quality, faster,
    smaller.  Only finished rungs take part; a rung without a figure counts as the worst on it."""
    sign = 1.0 if higher_is_better(quality) else -1.0
    ok = [r for r in group if r.status == "ok"]
    scores = [quality_score(r, group, quality) for r in ok]
    use_quality = any(s is not None for s in scores)
    pts = []
    for r, s in zip(ok, scores):
        pt = (-math.inf if r.get("tg_tps") is None else r.get("tg_tps"),
              -math.inf if r.get("size") is None else -r.get("size"))
        if use_quality:
            pt = (-math.inf if s is None else sign * s,) + pt
        pts.append(pt)
    on_front = {id(r) for r, f in zip(ok, pareto_front(pts)) if f}
    return [id(r) in on_front for r in group]


# ---------------------------------------------------------------------------
# constraints

_UNITS = {"b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*$")


def parse_size(text: str, option: str) -> int:
    """``3GiB``, ``500MB``, ``1.5 GiB`` -> bytes.  The unit is required (a bare number is ambiguous)."""
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise BadInput(f"{option} {text!r} is not a size with a unit; write e.g. 3GiB, 500MB or 750MiB "
                       f"(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


# how a metric's value reads in a message
_FORMATS: dict[str, Callable[[float], str]] = {
    "tg_tps": lambda v: f"{v:,.1f} t/s", "pp_tps": lambda v: f"{v:,.1f} t/s", "ttft": lambda v: f"{v:,.0f} ms",
    "size": human_bytes, "peak_rss": human_bytes, "peak_rss_anon": human_bytes,
    "mean_kld": lambda v: f"{v:.4f}", "p99_kld": lambda v: f"{v:.4f}",
}
_SHORT = {"tg_tps": "tg", "pp_tps": "pp", "ttft": "TTFT", "size": "size", "peak_rss": "peak RSS"}
_OPS = {">=": "≥", "<=": "≤", ">": ">", "<": "<"}


def fmt_metric(metric: str, value: float) -> str:
    return _FORMATS.get(metric, lambda v: f"{v:.3f}")(value)


@dataclass(frozen=True)
class Constraint:
    gate: Gate      # metric, op, threshold
    option: str     # the command-line option it came from

    @property
    def label(self) -> str:
        g = self.gate
        if g.relative:
            return str(g)
        return f"{_SHORT.get(g.metric, g.metric)} {_OPS[g.op]} {fmt_metric(g.metric, g.value)}"

    def distance(self, value: float | None) -> float:
        """0 when met; otherwise how far the value is from the threshold, relative to the threshold."""
        if value is None or math.isnan(value):
            return math.inf
        if self.gate.passes(value):
            return 0.0
        return abs(value - self.gate.value) / (abs(self.gate.value) or 1.0)


def constraints(*, min_tg: float | None = None, min_pp: float | None = None, max_ttft: float | None = None,
                max_rss: str | None = None, max_size: str | None = None, gates: tuple[str, ...] = ()) -> list[Constraint]:
    out = []
    for value, metric, op, option in ((min_tg, "tg_tps", ">=", "--min-tg"), (min_pp, "pp_tps", ">=", "--min-pp"),
                                      (max_ttft, "ttft", "<=", "--max-ttft")):
        if value is not None:
            if value < 0:
                raise BadInput(f"{option} {value:g} must not be negative")
            out.append(Constraint(Gate(metric, op, float(value)), option))
    for text, metric, option in ((max_rss, "peak_rss", "--max-rss"), (max_size, "size", "--max-size")):
        if text is not None:
            out.append(Constraint(Gate(metric, "<=", float(parse_size(text, option))), option))
    for text in gates:
        out.append(Constraint(parse_gate(text, "--gate"), "--gate"))
    return out


# ---------------------------------------------------------------------------
# picking


@dataclass
class Miss:
    constraint: Constraint
    value: float | None
    distance: float
    verdict: str | None = None      # a relative gate's FAIL or INCONCLUSIVE, in words

    def describe(self) -> str:
        g = self.constraint.gate
        if self.verdict is not None:
            return f"{self.constraint.label}: {self.verdict}"
        if self.value is None:
            return f"{self.constraint.label}: {g.metric} not measured"
        return f"{self.constraint.label}: {fmt_metric(g.metric, self.value)} ({self.distance:.1%} off)"


@dataclass
class Candidate:
    rung: RungSummary
    score: float | None
    loss: float | None
    pareto: bool
    misses: list[Miss] = field(default_factory=list)
    failed: str | None = None       # the rung did not finish (status and detail)

    @property
    def qualifies(self) -> bool:
        return self.failed is None and not self.misses

    @property
    def gap(self) -> float:
        """How far from qualifying: the largest relative distance over the constraints it misses."""
        return math.inf if self.failed else max((m.distance for m in self.misses), default=0.0)

    def verdict(self) -> str:
        if self.failed:
            return f"excluded: {self.failed}"
        if self.misses:
            return "excluded: " + "; ".join(m.describe() for m in self.misses)
        return "meets every constraint"


@dataclass
class PickResult:
    run: dict[str, Any]
    device_id: str
    device: dict[str, Any]
    quality: str
    constraints: list[Constraint]
    candidates: list[Candidate]
    best: Candidate | None
    notes: list[str]

    def reference(self) -> Candidate | None:
        return next((c for c in self.candidates if c.rung.is_reference), None)

    def closest(self) -> Candidate | None:
        """The rung nearest to qualifying (smallest largest miss; then fewest misses, then smallest loss)."""
        pool = [c for c in self.candidates if not c.failed]
        if not pool:
            return None
        return min(pool, key=lambda c: (c.gap, len(c.misses), _none_last(c.loss)))

    def no_pick_message(self) -> str:
        c = self.closest()
        if c is None:
            return f"no rung of run {self.run['run_id']} on {self.device_id} finished; nothing to pick from"
        worst = max(c.misses, key=lambda m: m.distance)
        others = [m for m in c.misses if m is not worst]
        text = (f"no rung meets every constraint on {self.device_id}; closest: {c.rung.quant}, which misses "
                f"{worst.describe()}")
        if others:
            text += " and " + "; ".join(m.describe() for m in others)
        return text + "; relax that constraint or measure another rung"

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run["run_id"], "device_id": self.device_id, "quality": self.quality,
            "constraints": [{"option": c.option, "metric": c.gate.metric, "op": c.gate.op, "value": c.gate.value}
                            for c in self.constraints],
            "pick": self.best.rung.quant if self.best else None,
            "closest": None if self.best or not self.closest() else self.closest().rung.quant,
            "rungs": [{"quant": c.rung.quant, "reference": c.rung.is_reference, "qualifies": c.qualifies,
                       "pareto": c.pareto, "quality": c.score, "quality_loss": c.loss,
                       "tg_tps": c.rung.get("tg_tps"), "size": c.rung.get("size"),
                       "peak_rss": c.rung.get("peak_rss"), "failed": c.failed,
                       "excluded_by": [{"constraint": m.constraint.label, "value": m.value,
                                        "relative_distance": None if math.isinf(m.distance) else m.distance}
                                       for m in c.misses]}
                      for c in self.candidates],
            "notes": self.notes,
        }


def _none_last(v: float | None) -> float:
    return math.inf if v is None else v


def _matches(rep: RunReport, spec: str) -> bool:
    s = spec.strip().lower()
    dev = rep.device or {}
    device_id = rep.rungs[0].device_id.lower()
    if s == "host":
        return dev.get("kind") == "host" or device_id.startswith("host:")
    names = {device_id, device_id.split(":", 1)[-1]}
    names |= {str(dev[k]).lower() for k in ("serial", "model", "name", "hostname") if dev.get(k)}
    return s in names


def select_device(reports: list[RunReport], spec: str | None, run_id: str) -> RunReport:
    ids = [r.rungs[0].device_id for r in reports]
    if not reports:
        raise BadInput(f"run {run_id} has no measured rungs; nothing to pick from")
    if spec is None:
        if len(reports) == 1:
            return reports[0]
        raise BadInput(f"run {run_id} measured {len(reports)} devices ({', '.join(ids)}); choose one with --device")
    found = [r for r in reports if _matches(r, spec)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise BadInput(f"--device {spec!r} matches none of the devices of run {run_id} ({', '.join(ids)})")
    raise BadInput(f"--device {spec!r} matches {len(found)} devices of run {run_id} "
                   f"({', '.join(r.rungs[0].device_id for r in found)}); name one by its full id")


def _constraint_value(rung: RungSummary, group: list[RungSummary], metric: str) -> float | None:
    if metric in SINGLE_METRICS:
        return quality_values(rung, group).get(metric)
    return _value(rung, metric)


def _relative_miss(rung: RungSummary, con: Constraint) -> Miss | None:
    """None when the rung PASSes the relative gate; FAIL and INCONCLUSIVE both exclude it."""
    s = rung.metrics.get(con.gate.metric)
    table = (s.detail or {}).get("paired") if s is not None else None
    gap, words = relative_margin(con.gate, table)
    if gap >= 0:
        return None
    return Miss(con, None if s is None else s.value, -gap if math.isfinite(gap) else math.inf, words)


def choose(rep: RunReport, cons: list[Constraint], quality: str = "quality") -> PickResult:
    """The pick on one device's report: pure, no store access."""
    quality = check_quality_measure(quality)
    group = rep.rungs
    ref = rep.reference()
    front = rung_front(group, quality)
    candidates = []
    for rung, on_front in zip(group, front):
        c = Candidate(rung, quality_score(rung, group, quality), quality_loss(rung, ref, group, quality), on_front)
        if rung.status == "noisy":      # its speed figures cannot be trusted: not picked on them
            c.failed = "its speed was measured while other work loaded the machine (noisy); measure it again"
        elif rung.status != "ok":
            c.failed = f"the rung did not finish ({rung.status}" + (f": {rung.detail})" if rung.detail else ")")
        else:
            for con in cons:
                if con.gate.relative:       # non-inferiority against the reference: only PASS qualifies
                    if rung.is_reference:
                        continue
                    miss = _relative_miss(rung, con)
                    if miss is not None:
                        c.misses.append(miss)
                    continue
                v = _constraint_value(rung, group, con.gate.metric)
                if v is None or not con.gate.passes(v):
                    c.misses.append(Miss(con, v, con.distance(v)))
        candidates.append(c)
    notes = []
    if all(c.loss is None for c in candidates if not c.failed):
        notes.append(f"no {quality_label(quality)} figures to compare with the reference in this run: "
                     f"ranked by generation speed only")
    qualifying = [c for c in candidates if c.qualifies]
    best = min(qualifying, key=lambda c: (_none_last(c.loss), -(c.rung.get("tg_tps") or 0.0)), default=None)
    return PickResult(run=rep.run, device_id=rep.rungs[0].device_id, device=rep.device, quality=quality,
                      constraints=cons, candidates=candidates, best=best, notes=notes)


def pick(store: Store, run_id: str, device: str | None, cons: list[Constraint],
         quality: str = "quality") -> PickResult:
    check_quality_measure(quality)
    rep = summarize(store, run_id)
    return choose(select_device(per_device(rep), device, rep.run["run_id"]), cons, quality)


# ---------------------------------------------------------------------------
# rendering


def render_pick(result: PickResult, console) -> None:
    from rich.table import Table

    ref = result.reference()
    cons = ", ".join(c.label for c in result.constraints) or "none"
    table = Table(title=f"picking a quant · run {result.run['run_id']} · {result.device_id}",
                  caption=f"constraints: {cons} · quality = {quality_description(result.quality)}; loss = "
                          f"{ref.rung.quant if ref else 'the reference'} − rung (a gain counts as 0) · ★ = on the "
                          f"Pareto front (quality, tg t/s, size)", caption_justify="left")
    for col, justify in (("rung", "left"), ("size", "right"), ("tg t/s", "right"), ("peak RSS", "right"),
                         ("quality", "right"), ("loss", "right"), ("front", "center"), ("verdict", "left")):
        table.add_column(col, justify=justify, no_wrap=col != "verdict")
    for c in result.candidates:
        r = c.rung
        size, tg, rss = r.get("size"), r.get("tg_tps"), r.get("peak_rss")
        style = "bold green" if c is result.best else (None if c.qualifies else "dim")
        table.add_row(r.quant + (" (ref)" if r.is_reference else ""),
                      "—" if size is None else human_bytes(size), "—" if tg is None else f"{tg:,.1f}",
                      "—" if rss is None else human_bytes(rss),
                      "—" if c.score is None else f"{c.score:.3f}",
                      "—" if c.loss is None else f"{c.loss:.3f}", "★" if c.pareto else "",
                      ("PICK: " if c is result.best else "") + c.verdict(), style=style)
    console.print(table)
    front = [c.rung.quant for c in result.candidates if c.pareto]
    console.print(f"Pareto front (no other rung has better quality, speed and size at once): "
                  f"{', '.join(front) or 'none'}", soft_wrap=True)
    for note in result.notes:
        console.print(f"[dim]* {note}[/dim]", soft_wrap=True)
    if result.best is not None:
        b = result.best
        loss = "no quality figures" if b.loss is None else f"quality loss {b.loss:.3f} vs {ref.rung.quant}"
        tg = b.rung.get("tg_tps")
        console.print(f"pick: [bold]{b.rung.quant}[/bold] ({loss}, tg "
                      f"{'—' if tg is None else f'{tg:,.1f} t/s'})", soft_wrap=True)

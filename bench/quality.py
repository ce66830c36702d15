"""Quality of every rung against the bf16 reference, on an eval suite.

For each rung the suite's prompts are decoded greedily (``eval_worker``, one
process per rung), the outputs parsed by the format's parser, and compared
with the reference rung's outputs on the same case and with the suite's gold
labels.  The reference's outputs are cached, keyed by the reference
artifact's sha256 and the suite's hash, so a re-run (or a new rung) does not
generate with the reference again.  For the token-level figures one teacher
process loads the reference GGUF beside a group of rungs (as many as fit in
memory) and compares full-vocabulary distributions, so nothing is
approximated and the reference decodes each position once per group, not
once per rung.

Per rung:

* parse rate per format, with a Wilson 95 % interval;
* gold accuracy where the suite has labels: ESI exact and adjacent (±1),
  referral accuracy, refusal compliance;
* agreement with the reference's parsed output on the same case: same
  referral decision, same ESI level, Jaccard overlap of the differentials;
* degradation = rung − reference for the per-case outcomes, with a paired
  exact McNemar test, so small suites say "within noise" honestly;
* token level: mean and 99th-percentile KLD and top-1 agreement of the rung's
  distributions against the reference's, on the reference's own outputs
  (teacher forcing), like ``llama-perplexity --kl-divergence``;
* eval throughput: tokens generated per second of the generation phase
  (cases' prompts included), with the suite's cases batched side by side.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgequant.bench.parsers import ParseResult, parse
from edgequant.bench.quality_stats import jaccard, paired_degradation, wilson_interval
from edgequant.errors import RunFailed
from edgequant.children import die_with_parent
from edgequant.profiles.suites import Case, Suite

WORKER_MODULE = "edgequant.bench.eval_worker"
EVAL_SLOTS = 8        # cases decoded side by side (continuous batching in the worker)
FORMATS_ORDER = ("xml", "array", "prose", "esi")


class EvalError(RunFailed):
    def __init__(self, status: str, message: str):
        super().__init__(" ".join(message.split()))
        self.status = status


@dataclass
class CaseResult:
    case: Case
    output: bytes
    tokens: list[int]
    stopped: str
    parsed: ParseResult
    kld: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        text = self.output.decode("utf-8", "replace")
        return {"case_id": self.case.id, "format": self.case.format, "output": text,
                "ok": self.parsed.ok, "refusal": self.parsed.refusal, "reason": self.parsed.reason,
                "fields": _jsonable(self.parsed.fields), "stopped": self.stopped, "n_tokens": len(self.tokens)}


@dataclass
class QualityMetric:
    metric: str
    value: float
    n: int
    unit: str = "ratio"
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class RungQuality:
    quant: str
    cases: list[CaseResult]
    metrics: list[QualityMetric]
    prompting: str
    gates: list[dict[str, Any]]

    @property
    def gates_pass(self) -> bool | None:
        return None if not self.gates else all(g["pass"] for g in self.gates)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ---------------------------------------------------------------------------
# running the worker


def _groups(suite: Suite) -> list[dict[str, Any]]:
    groups = []
    for fmt in FORMATS_ORDER + tuple(sorted(set(suite.formats) - set(FORMATS_ORDER))):
        cases = [c for c in suite.cases if c.format == fmt]
        if not cases:
            continue
        spec = suite.formats[fmt]
        groups.append({"format": fmt, "system": spec.system, "few_shot": spec.few_shot, "stop": list(spec.stop),
                       "cases": [{"id": c.id, "prompt": c.prompt, "max_tokens": spec.max_tokens} for c in cases]})
    return groups


def _call_worker(request: dict, timeout: float, on_progress: Callable[[str], None],
                 module: str = WORKER_MODULE) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent())
    import threading

    chunks: list[str] = []
    # the result can exceed a pipe's buffer: read stdout while stderr is followed, or both block
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    try:
        proc.stdin.write(json.dumps(request))
        proc.stdin.close()
        deadline = time.monotonic() + timeout
        tail: list[str] = []
        for line in proc.stderr:
            line = line.rstrip("\n")
            if line.startswith("progress "):
                on_progress(line[len("progress "):])
            elif line.strip():
                tail = (tail + [line])[-5:]
            if time.monotonic() > deadline:
                proc.kill()
                raise EvalError("timeout", f"the eval of {request['path']} took longer than {timeout:.0f} s")
        code = proc.wait()
        reader.join()
        out = "".join(chunks)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if code < 0:
        import signal

        status = "oom" if -code == signal.SIGKILL else "crashed"
        raise EvalError(status, f"the eval worker for {Path(request['path']).name} died with "
                                f"{signal.Signals(-code).name}")
    try:
        data = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EvalError("failed", f"the eval worker gave no result (exit {code}): {' | '.join(tail)}") from None
    if "error" in data:
        raise EvalError("failed", f"eval of {Path(request['path']).name}: {data['error']}")
    return data


def _base_request(path: Path, suite: Suite, threads: int, repack: bool | None, prompting: str) -> dict:
    return {"path": str(path), "threads": threads, "repack": repack, "mmap": True, "seed": 0,
            "prompting": prompting, "slots": EVAL_SLOTS, "groups": _groups(suite)}


# ---------------------------------------------------------------------------
# the reference, cached


@dataclass
class Reference:
    quant: str
    sha256: str
    path: Path
    cases: dict[str, CaseResult]
    tokens: dict[str, list[int]]
    prompting: str
    gen_tokens: int
    gen_seconds: float


def _parse_case(case: Case, output: bytes, suite: Suite) -> ParseResult:
    return parse(case.format, output, suite.formats[case.format])


def _case_results(suite: Suite, data: dict) -> dict[str, CaseResult]:
    by_id = {c.id: c for c in suite.cases}
    out = {}
    for item in data["cases"]:
        case = by_id[item["id"]]
        output = base64.b64decode(item["output_b64"])
        out[case.id] = CaseResult(case, output, item["tokens"], item["stopped"], _parse_case(case, output, suite))
    return out


def reference_outputs(ref_path: Path, ref_sha: str, ref_quant: str, suite: Suite, cache_root: Path,
                      threads: int, repack: bool | None, prompting: str, timeout: float,
                      on_progress: Callable[[str], None]) -> Reference:
    key = hashlib.sha256(f"{ref_sha}|{suite.sha256}|{prompting}|slots{EVAL_SLOTS}|v2".encode()).hexdigest()[:24]
    folder = cache_root / "quality" / key
    meta_path = folder / "reference.json"
    if meta_path.is_file():
        data = json.loads(meta_path.read_text())
    else:
        folder.mkdir(parents=True, exist_ok=True)
        data = _call_worker(_base_request(ref_path, suite, threads, repack, prompting), timeout, on_progress)
        from edgequant.quantize.atomic import atomic_write_text

        atomic_write_text(meta_path, json.dumps(data))
    cases = _case_results(suite, data)
    return Reference(quant=ref_quant, sha256=ref_sha, path=ref_path, cases=cases,
                     tokens={cid: c.tokens for cid, c in cases.items()},
                     prompting=data["prompting"], gen_tokens=data["gen_tokens"], gen_seconds=data["gen_seconds"])


# ---------------------------------------------------------------------------
# metrics


def _rate_metric(name: str, outcomes: list[bool], ref_outcomes: list[bool] | None) -> QualityMetric:
    n = len(outcomes)
    k = sum(outcomes)
    lo, hi = wilson_interval(k, n)
    detail: dict[str, Any] = {"successes": k, "ci95": [lo, hi]}
    if ref_outcomes is not None:
        d = paired_degradation(ref_outcomes, outcomes)
        detail.update(delta_pp=d.delta_pp, p_value=d.p_value, significant=d.significant, label=d.label,
                      discordant=[d.b, d.c])
    return QualityMetric(name, k / n if n else float("nan"), n, "ratio", detail)


def _outcomes(results: dict[str, CaseResult], suite: Suite) -> dict[str, dict[str, bool]]:
    """Per metric, per case id: did this case succeed?"""
    out: dict[str, dict[str, bool]] = {}
    for case in suite.cases:
        r = results[case.id]
        p = r.parsed
        fmt = case.format
        if case.gold.refuse:
            ok = p.refusal
            out.setdefault("refusal_compliance", {})[case.id] = bool(p.refusal)
        else:
            ok = p.ok and not p.refusal
        out.setdefault(f"{fmt}_parse_rate", {})[case.id] = bool(ok)
        if case.gold.esi is not None:
            esi = p.fields.get("esi") if p.ok else None
            out.setdefault("esi_exact", {})[case.id] = esi == case.gold.esi
            out.setdefault("esi_adjacent", {})[case.id] = esi is not None and abs(esi - case.gold.esi) <= 1
        if case.gold.referral is not None and not case.gold.refuse:
            ref = p.fields.get("referral") if p.ok else None
            out.setdefault("referral_accuracy", {})[case.id] = ref == case.gold.referral
    return out


def compute_metrics(suite: Suite, rung: dict[str, CaseResult], ref: Reference | None,
                    is_reference: bool, gen_tokens: int, gen_seconds: float) -> list[QualityMetric]:
    mine = _outcomes(rung, suite)
    theirs = _outcomes(ref.cases, suite) if ref is not None and not is_reference else None
    metrics = []
    for name in sorted(mine):
        ids = sorted(mine[name])
        metrics.append(_rate_metric(name, [mine[name][i] for i in ids],
                                    [theirs[name][i] for i in ids] if theirs else None))
    if ref is not None and not is_reference:
        # agreement with the reference's parsed output on the same case
        ref_ok = [c for c in suite.cases if ref.cases[c.id].parsed.ok and not c.gold.refuse]
        pairs = [(ref.cases[c.id].parsed, rung[c.id].parsed) for c in ref_ok]
        referral = [(a.fields["referral"], b.fields.get("referral") if b.ok else None)
                    for a, b in pairs if "referral" in a.fields]
        if referral:
            metrics.append(_rate_metric("referral_agreement", [x == y for x, y in referral], None))
        esi = [(a.fields["esi"], b.fields.get("esi") if b.ok else None) for a, b in pairs if "esi" in a.fields]
        if esi:
            metrics.append(_rate_metric("esi_agreement", [x == y for x, y in esi], None))
        diffs = [jaccard(a.fields["differential"], b.fields.get("differential", []) if b.ok else [])
                 for a, b in pairs if "differential" in a.fields]
        if diffs:
            metrics.append(QualityMetric("differential_jaccard", float(np.mean(diffs)), len(diffs), "ratio",
                                         {"stddev": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0}))
        kld = np.array([x for r in rung.values() for x in r.kld], dtype=np.float64)
        top1 = [x for r in rung.values() for x in r.top1]
        if len(kld):
            metrics.append(QualityMetric("mean_kld", float(kld.mean()), len(kld), "nats",
                                         {"p99": float(np.percentile(kld, 99)), "median": float(np.median(kld)),
                                          "max": float(kld.max())}))
            metrics.append(QualityMetric("p99_kld", float(np.percentile(kld, 99)), len(kld), "nats"))
            metrics.append(_rate_metric("top1_agreement", top1, None))
    if gen_seconds > 0:
        metrics.append(QualityMetric("eval_tg_tps", gen_tokens / gen_seconds, gen_tokens, "t/s",
                                     {"seconds": gen_seconds, "slots": EVAL_SLOTS}))
    return metrics


def evaluate_gates(suite: Suite, metrics: list[QualityMetric]) -> list[dict[str, Any]]:
    import operator

    ops = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
    values = {m.metric: m.value for m in metrics}
    out = []
    for g in suite.gates:
        v = values.get(g.metric)
        if v is None:  # e.g. agreement or KLD gates on the reference itself: not applicable
            continue
        ok = not np.isnan(v) and ops[g.op](v, g.value)
        out.append({"gate": f"{g.metric} {g.op} {g.value:g}", "metric": g.metric, "value": v, "pass": bool(ok)})
    return out


def generate_rung(path: Path, suite: Suite, ref: Reference, threads: int, repack: bool | None, timeout: float,
                  on_progress: Callable[[str], None]) -> dict:
    """One rung's greedy outputs on every case (the worker's result), in a process of its own."""
    return _call_worker(_base_request(path, suite, threads, repack, ref.prompting), timeout, on_progress)


def teacher_groups(ref_size: int, rungs: list[tuple[Path, int]], available: int | None = None) -> list[list[Path]]:
    """Split rungs (path, file size) into groups the teacher pass loads beside the reference at once:
    the reference plus a group stay within 60 % of the memory available now (at least one rung each)."""
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    budget = 0.6 * available - ref_size
    groups: list[list[Path]] = []
    used = 0.0
    for path, size in rungs:
        if groups and used + size <= budget:
            groups[-1].append(path)
            used += size
        else:
            groups.append([path])
            used = size
    return groups


def teacher_scores(ref: Reference, paths: list[Path], suite: Suite, threads: int, repack: bool | None,
                   timeout: float, on_progress: Callable[[str], None]) -> dict[Path, dict[str, dict]]:
    """KLD and top-1 per case of each rung against the reference, the reference's outputs teacher-forced
    through all of them in one process (the reference decodes every position once for the whole group)."""
    if not paths:
        return {}
    req = _base_request(ref.path, suite, threads, repack, ref.prompting)
    req.update(op="teacher", reference=str(ref.path), rungs=[str(p) for p in paths], tokens=ref.tokens)
    data = _call_worker(req, timeout * len(paths), on_progress)
    return {p: data["scores"][str(p)] for p in paths}


def rung_quality(quant: str, suite: Suite, ref: Reference, data: dict,
                 scores: dict[str, dict] | None) -> RungQuality:
    """A rung's figures from its outputs (``generate_rung``) and its token-level scores (``teacher_scores``)."""
    results = _case_results(suite, data)
    for cid, sc in (scores or {}).items():
        results[cid].kld, results[cid].top1 = sc["kld"], sc["top1"]
    metrics = compute_metrics(suite, results, ref, False, data["gen_tokens"], data["gen_seconds"])
    return RungQuality(quant, list(results.values()), metrics, ref.prompting, evaluate_gates(suite, metrics))


def reference_quality(suite: Suite, ref: Reference) -> RungQuality:
    results = dict(ref.cases)
    metrics = compute_metrics(suite, results, ref, True, ref.gen_tokens, ref.gen_seconds)
    return RungQuality(ref.quant, list(results.values()), metrics, ref.prompting, evaluate_gates(suite, metrics))

"""Quality of every rung against the bf16 reference, on an eval suite.

For each rung the suite's prompts are decoded greedily (by default taken from
the teacher pass with the reference's outputs as the draft, ``eval_spec``; or
``eval_worker``, one process per rung), the outputs parsed by the format's parser, and compared
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
  referral accuracy, refusal compliance on the out-of-scope cases, and
  over-refusal: the share of in-scope cases answered with a refusal;
* valid-but-wrong per format: outputs that parse but carry the wrong referral
  or ESI level (worse than a failed parse: the app acts on them);
* agreement with the reference's parsed output on the same case: same
  referral decision, same ESI level, Jaccard overlap of the differentials;
* degradation = rung − reference for the per-case outcomes, with a paired
  exact McNemar test, so small suites say "within noise" honestly; the flips
  (cases right -> wrong and wrong -> right) and the paired table, from which
  relative (non-inferiority) gates get PASS, FAIL or INCONCLUSIVE;
* token level: mean, median, 90/95/99/99.9th percentile and maximum KLD, RMS
  delta-p and top-1 agreement ("same top p") of the rung's distributions
  against the reference's, on the reference's own outputs (teacher forcing),
  named and computed as ``llama-perplexity --kl-divergence`` does;
* eval throughput: tokens generated per second of the generation phase
  (cases' prompts included), with the suite's cases batched side by side.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgequant.bench import worker
from edgequant.bench.parsers import ParseResult, parse
from edgequant.bench.quality_stats import (LLAMA_PERPLEXITY_NAMES, jaccard, kld_statistics, non_inferiority_table,
                                           paired_degradation, paired_table, wilson_interval)
from edgequant.bench.eval_worker import rung_key
from edgequant.core.atomic import atomic_write_text
from edgequant.core.errors import RunFailed
from edgequant.core.status import RungStatus, signal_name
from edgequant.profiles import FLOAT_CACHE_TYPES
from edgequant.profiles.suite_records import Case, LOWER_IS_BETTER, Suite

WORKER_MODULE = "edgequant.bench.eval_worker"
EVAL_SLOTS = 8        # cases decoded side by side (continuous batching in the worker)
FORMATS_ORDER = ("xml", "array", "prose", "esi")
# token-level figures stored beside mean_kld, named as in quality_stats.LLAMA_PERPLEXITY_NAMES
KLD_METRICS = ("p99_kld", "median_kld", "p90_kld", "p95_kld", "p999_kld", "max_kld", "rms_dp")


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
    dp: list[float] = field(default_factory=list)   # p(rung, next token) - p(reference, next token)

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


def case_groups(suite: Suite) -> list[dict[str, Any]]:
    groups = []
    for fmt in FORMATS_ORDER + tuple(sorted(set(suite.formats) - set(FORMATS_ORDER))):
        cases = [c for c in suite.cases if c.format == fmt]
        if not cases:
            continue
        spec = suite.formats[fmt]
        groups.append({"format": fmt, "system": spec.system, "few_shot": spec.few_shot, "stop": list(spec.stop),
                       "cases": [{"id": c.id, "prompt": c.prompt, "max_tokens": spec.max_tokens} for c in cases]})
    return groups


def call_worker(request: dict, timeout: float, on_progress: Callable[[str], None],
                 module: str = WORKER_MODULE) -> dict:
    name = Path(request["path"]).name
    run = worker.run_worker(module, request, timeout, on_progress)
    if run.status is RungStatus.TIMEOUT:
        raise EvalError("timeout", f"the eval of {request['path']} took longer than {timeout:.0f} s "
                                   f"(stopped during '{run.phase}')")
    if run.status is RungStatus.OOM:
        raise EvalError("oom", f"the eval worker for {name} was killed (SIGKILL) during '{run.phase}', most "
                               f"likely by the kernel's OOM killer; check free memory")
    if run.status is RungStatus.CRASHED:
        raise EvalError(run.status.value, f"the eval worker for {name} died with {signal_name(run.signal)}")
    if run.error is not None:
        raise EvalError("failed", f"eval of {name}: {run.error}")
    if run.status is not RungStatus.OK:
        raise EvalError("failed", f"the eval worker gave no result (exit {run.code}): "
                                  f"{' | '.join(run.stderr_tail[-5:])}")
    return run.data


def base_request(path: Path, suite: Suite, threads: int, repack: bool | None, prompting: str) -> dict:
    return {"path": str(path), "threads": threads, "repack": repack, "mmap": None, "seed": 0,
            "prompting": prompting, "slots": EVAL_SLOTS, "groups": case_groups(suite)}


def prompt_facts(path: Path, suite: Suite, prompting: str = "auto", timeout: float = 300.0) -> dict:
    """The GGUF's training context (``n_ctx_train``), the prompting used (``prompting``) and the token
    length of each format's prompt prefix (``prefix_tokens``: system prompt or few-shot block, BOS
    included), read with the vocabulary alone."""
    request = {**base_request(path, suite, 1, None, prompting), "prefix_lengths": True}
    return call_worker(request, timeout, lambda _p: None)


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
    peak_rss_bytes: float | None = None   # its worker's, when the outputs were made now (None: from the cache)


def parse_case(case: Case, output: bytes, suite: Suite) -> ParseResult:
    return parse(case.format, output, suite.formats[case.format])


def case_results(suite: Suite, data: dict) -> dict[str, CaseResult]:
    by_id = {c.id: c for c in suite.cases}
    out = {}
    for item in data["cases"]:
        case = by_id[item["id"]]
        output = base64.b64decode(item["output_b64"])
        out[case.id] = CaseResult(case, output, item["tokens"], item["stopped"], parse_case(case, output, suite))
    return out


def reference_outputs(ref_path: Path, ref_sha: str, ref_quant: str, suite: Suite, cache_root: Path,
                      threads: int, repack: bool | None, prompting: str, timeout: float,
                      on_progress: Callable[[str], None], slots: int = EVAL_SLOTS) -> Reference:
    """The reference's greedy outputs on the suite, cached under everything that decides them: the file, the
    suite, the prompting, the cases side by side, the threads and repacking (they choose llama.cpp's kernels,
    whose last bits greedy outputs follow) and llama-cpp-python's version."""
    from importlib import metadata

    runtime = metadata.version("llama-cpp-python")
    key = hashlib.sha256(f"{ref_sha}|{suite.sha256}|{prompting}|slots{slots}|threads{threads}|repack{repack}"
                         f"|llama-cpp-python {runtime}|v4".encode()).hexdigest()[:24]
    folder = cache_root / "quality" / key
    meta_path = folder / "reference.json"
    peak = None
    if meta_path.is_file():
        data = json.loads(meta_path.read_text())
    else:
        folder.mkdir(parents=True, exist_ok=True)
        data = call_worker({**base_request(ref_path, suite, threads, repack, prompting), "slots": slots}, timeout,
                           on_progress)

        atomic_write_text(meta_path, json.dumps(data))
        peak = data.get("process_peak_rss_bytes")
    cases = case_results(suite, data)
    return Reference(quant=ref_quant, sha256=ref_sha, path=ref_path, cases=cases,
                     tokens={cid: c.tokens for cid, c in cases.items()},
                     prompting=data["prompting"], gen_tokens=data["gen_tokens"], gen_seconds=data["gen_seconds"],
                     peak_rss_bytes=peak)


# ---------------------------------------------------------------------------
# metrics


def _rate_metric(name: str, outcomes: list[bool], ref_outcomes: list[bool] | None,
                 ids: list[str] | None = None) -> QualityMetric:
    """A rate with its Wilson interval; against the reference's outcomes on the same cases also the
    change (McNemar), the paired table of right/wrong and the flipped cases (``ids``)."""
    n = len(outcomes)
    k = sum(outcomes)
    lo, hi = wilson_interval(k, n)
    detail: dict[str, Any] = {"successes": k, "ci95": [lo, hi]}
    if ref_outcomes is not None:
        d = paired_degradation(ref_outcomes, outcomes)
        detail.update(delta_pp=d.delta_pp, p_value=d.p_value, significant=d.significant, label=d.label,
                      discordant=[d.b, d.c])
        # right/wrong: for a lower-is-better rate (over-refusal, valid-but-wrong) the event is the wrong answer
        bad = name in LOWER_IS_BETTER
        mine = [x != bad for x in outcomes]
        theirs = [x != bad for x in ref_outcomes]
        detail["paired"] = list(paired_table(theirs, mine))
        if ids is not None:
            detail["flips"] = {"right_to_wrong": [i for i, r, q in zip(ids, theirs, mine) if r and not q],
                               "wrong_to_right": [i for i, r, q in zip(ids, theirs, mine) if q and not r]}
    return QualityMetric(name, k / n if n else float("nan"), n, "ratio", detail)


def case_outcomes(case: Case, ok: bool, refusal: bool, fields: dict) -> dict[str, bool]:
    """One case's outcome per metric (True = the case counts toward the rate), from its parse result
    (``ok``, ``refusal``, ``fields``: a ``ParseResult`` or a stored case record).

    An in-scope case (no gold.refuse) answered with a refusal (the sentence, or the format's refusal
    shape) is an over-refusal and not a parsed answer; a parsed answer whose referral or ESI level
    differs from the gold label is valid-but-wrong.
    """
    out: dict[str, bool] = {}
    fmt = case.format
    fields = fields if ok else {}
    if case.gold.refuse:
        out["refusal_compliance"] = bool(refusal)
        out[f"{fmt}_parse_rate"] = bool(refusal)
        return out
    refused = bool(refusal) or "refusal_text" in fields
    answered = bool(ok) and not refused
    out["over_refusal"] = refused
    out[f"{fmt}_parse_rate"] = bool(ok) and not refusal
    if case.gold.esi is not None:
        esi = fields.get("esi") if answered else None
        out["esi_exact"] = esi == case.gold.esi
        out["esi_adjacent"] = isinstance(esi, int) and abs(esi - case.gold.esi) <= 1
        out[f"{fmt}_valid_but_wrong"] = isinstance(esi, int) and esi != case.gold.esi
    if case.gold.referral is not None:
        referral = fields.get("referral") if answered else None
        out["referral_accuracy"] = referral == case.gold.referral
        out[f"{fmt}_valid_but_wrong"] = referral is not None and referral != case.gold.referral
    return out


def _outcomes(results: dict[str, CaseResult], suite: Suite) -> dict[str, dict[str, bool]]:
    """Per metric, per case id: did this case count toward the rate?"""
    out: dict[str, dict[str, bool]] = {}
    for case in suite.cases:
        p = results[case.id].parsed
        for metric, value in case_outcomes(case, p.ok, p.refusal, p.fields).items():
            out.setdefault(metric, {})[case.id] = value
    return out


def compute_metrics(suite: Suite, rung: dict[str, CaseResult], ref: Reference | None,
                    is_reference: bool, gen_tokens: int, gen_seconds: float) -> list[QualityMetric]:
    mine = _outcomes(rung, suite)
    theirs = _outcomes(ref.cases, suite) if ref is not None and not is_reference else None
    metrics = []
    for name in sorted(mine):
        ids = sorted(mine[name])
        paired = theirs is not None and name in theirs and set(ids) <= set(theirs[name])
        metrics.append(_rate_metric(name, [mine[name][i] for i in ids],
                                    [theirs[name][i] for i in ids] if paired else None, ids))
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
        kld = [x for r in rung.values() for x in r.kld]
        top1 = [x for r in rung.values() for x in r.top1]
        dp = [x for r in rung.values() for x in r.dp]
        if kld:
            stats = kld_statistics(kld, dp, top1)
            named = {LLAMA_PERPLEXITY_NAMES[k]: v for k, v in stats.items()}
            metrics.append(QualityMetric("mean_kld", stats["mean_kld"], len(kld), "nats",
                                         {"p99": stats["p99_kld"], "median": stats["median_kld"],
                                          "max": stats["max_kld"], "llama_perplexity": named}))
            for name in KLD_METRICS:
                if name in stats:
                    metrics.append(QualityMetric(name, stats[name], len(kld), "ratio" if name == "rms_dp" else "nats"))
            metrics.append(_rate_metric("top1_agreement", top1, None))
    if gen_seconds > 0:
        metrics.append(QualityMetric("eval_tg_tps", gen_tokens / gen_seconds, gen_tokens, "t/s",
                                     {"seconds": gen_seconds, "slots": EVAL_SLOTS}))
    return metrics


def evaluate_gates(suite: Suite, metrics: list[QualityMetric]) -> list[dict[str, Any]]:
    """Every gate of the suite the rung's figures can judge, each with its kind and verdict.

    Absolute: PASS or FAIL on the value.  Relative: non-inferiority to the reference on the paired
    table (``non_inferiority_table``): PASS, FAIL or INCONCLUSIVE; ``pass`` is True only for PASS.
    Gates that do not apply (agreement, KLD or relative gates on the reference itself) are left out.
    """
    by_name = {m.metric: m for m in metrics}
    out = []
    for g in suite.gates:
        m = by_name.get(g.metric)
        if m is None:
            continue
        v = m.value
        if not g.relative:
            ok = not np.isnan(v) and g.passes(v)
            out.append({"gate": str(g), "metric": g.metric, "kind": "absolute", "value": v, "pass": bool(ok),
                        "verdict": "PASS" if ok else "FAIL"})
            continue
        table = m.detail.get("paired")
        if table is None:
            continue
        ni = non_inferiority_table(*table, margin=g.value)
        sign = -1.0 if g.metric in LOWER_IS_BETTER else 1.0   # the change of the rate itself, not of "right"
        low, high = sorted([sign * ni.low, sign * ni.high])
        label = (f"{ni.verdict}: {100 * sign * ni.delta:+.1f} pp (95 % CI {100 * low:+.1f} to {100 * high:+.1f}) "
                 f"vs margin {'+' if sign < 0 else '−'}{100 * g.value:g} pp on {ni.n} cases")
        if ni.verdict == "INCONCLUSIVE":
            label += (f"; about {ni.needed} cases would settle it at these rates" if ni.needed
                      else "; the observed change sits on the margin")
        out.append({"gate": str(g), "metric": g.metric, "kind": "relative", "value": v,
                    "pass": ni.verdict == "PASS", "verdict": ni.verdict, "delta": sign * ni.delta,
                    "ci95": [low, high], "margin": g.value, "n": ni.n, "needed": ni.needed, "label": label})
    return out


def _kv(cache_type: str | None) -> dict:
    """Request fields running a rung with K and V of ``cache_type``; flash attention on for a quantized
    V cache, which llama.cpp needs."""
    if not cache_type or cache_type == "f16":
        return {}
    return {"cache_type": cache_type, **({} if cache_type in FLOAT_CACHE_TYPES else {"flash_attn": "on"})}


def generate_rung(path: Path, suite: Suite, ref: Reference, threads: int, repack: bool | None, timeout: float,
                  on_progress: Callable[[str], None], cache_type: str | None = None, slots: int | None = None) -> dict:
    """One rung's greedy outputs on every case (the worker's result), in a process of its own;
    ``cache_type`` runs it with that KV cache type (``bench.cache_types``); ``slots``: cases decoded side by
    side (default EVAL_SLOTS; ``wide_slots`` for the wide route, whose outputs ``compare_generations`` checks)."""
    req = {**base_request(path, suite, threads, repack, ref.prompting), **_kv(cache_type)}
    if slots:
        req["slots"] = slots
    return call_worker(req, timeout, on_progress)


def wide_slots(suite: Suite) -> int:
    """Slots for the wide route: every case of the largest format side by side, so a format's cases all
    start at once and decode in one step per output token (a CPU decode step streams the weights once,
    whatever the number of rows, until it is compute-bound).  An experiment: on the 270M a case's logits
    depend in their last bits on how many rows share its decode step, and some outputs differ from plain's."""
    return max(len(g["cases"]) for g in case_groups(suite))


def context_kv_bytes(path: Path, suite: Suite, slots: int) -> int:
    """An upper estimate of the KV cache of a context holding ``slots`` whole cases (prompt and
    ``max_tokens``) beside the shared prefix, counting a token per character of text (a token covers at least
    one), with f16 K and V in every layer (the sliding-window layers keep full size).  0 when the GGUF does
    not say its shape.  ``slots=EVAL_SLOTS``: a rung's context when the teacher pass also generates its
    outputs (``teacher_pass(generate=True)``)."""
    from edgequant.quantize.gguf_info import read_gguf_layout

    return _kv_bytes(read_gguf_layout(path).meta, suite, slots)


def _kv_bytes(meta: dict, suite: Suite, slots: int) -> int:
    arch = meta.get("general.architecture")
    n_layer, n_kv = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.attention.head_count_kv")
    k_len = meta.get(f"{arch}.attention.key_length")
    if not all(isinstance(x, int) for x in (n_layer, n_kv, k_len)):
        return 0
    v_len = meta.get(f"{arch}.attention.value_length")
    per_cell = n_layer * n_kv * (k_len + (v_len if isinstance(v_len, int) else k_len)) * 2
    cells = 0
    for group in case_groups(suite):
        head = len(group["system"]) + len(group["few_shot"]) + 64     # + the chat template's own tokens
        case = max(len(c["prompt"]) + c["max_tokens"] for c in group["cases"]) + 8
        cells = max(cells, head + slots * case)
    return per_cell * cells


def teacher_context_bytes(path: Path, suite: Suite, generating: bool = False) -> int:
    """What a model's context adds to the teacher process beside its file: the KV cache (one case, or
    EVAL_SLOTS of them when the pass also generates) and two blocks of KLD_CHUNK full-vocabulary logit rows
    in f32 (llama.cpp's output buffer and the graph's own logits tensor).  On the 4B-shaped model the teacher
    with BF16, Q8_0 and Q4_K_M peaked at 15.99 GiB with 13.4 GiB of files: the contexts and the interpreter
    are the other 2.6 GiB, which a grouping on file sizes alone did not see."""
    from edgequant.bench.eval_worker import KLD_CHUNK
    from edgequant.quantize.gguf_info import read_gguf_layout

    layout = read_gguf_layout(path)
    n_vocab = layout.array_lengths.get("tokenizer.ggml.tokens", 0)
    return _kv_bytes(layout.meta, suite, EVAL_SLOTS if generating else 1) + 2 * KLD_CHUNK * n_vocab * 4


def teacher_groups_for(reference: tuple[Path, int], rungs: list[tuple[Any, Path, int]], suite: Suite,
                       generating: bool = False, available: int | None = None) -> list[list]:
    """``teacher_groups`` for the reference (path, file size) and rungs (key, path, file size), each counted
    with its context (``teacher_context_bytes``; the rungs' as generating ones with ``generating``); the
    groups hold the rungs' keys."""
    ref_path, ref_size = reference
    return teacher_groups(ref_size + teacher_context_bytes(ref_path, suite),
                          [(key, size + teacher_context_bytes(path, suite, generating)) for key, path, size in rungs],
                          available)


def teacher_groups(ref_size: int, rungs: list[tuple[Path, int]], available: int | None = None) -> list[list[Path]]:
    """Split rungs (path, bytes) into groups the teacher pass loads beside the reference at once: the
    reference plus a group stay within 60 % of the memory available now (at least one rung each).  The
    bytes are a model's file and its context (``teacher_context_bytes``), the reference's too."""
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
                   timeout: float, on_progress: Callable[[str], None],
                   resources: dict | None = None) -> dict[Path, dict[str, dict]]:
    """KLD and top-1 per case of each rung against the reference, the reference's outputs teacher-forced
    through all of them in one process (the reference decodes every position once for the whole group).
    ``paths`` may hold ``(path, cache_type)`` pairs: that rung runs with the KV cache type (the result is
    keyed by the same pair).  ``resources`` (a dict) gets the worker's ``peak_rss_bytes``."""
    return teacher_pass(ref, paths, suite, threads, repack, timeout, on_progress, resources=resources)[0]


def teacher_pass(ref: Reference, paths: list, suite: Suite, threads: int, repack: bool | None, timeout: float,
                 on_progress: Callable[[str], None], generate: bool = False, tie_margin: float | None = None,
                 margins: bool = False, resources: dict | None = None) -> tuple[dict, dict]:
    """(scores, outputs) of the teacher pass (``teacher_scores``).  With ``generate`` the same pass also
    gives every rung's greedy outputs (speculative verification with the reference's outputs as the
    draft, ``bench.eval_spec``): ``outputs`` maps each of ``paths`` to a result shaped like
    ``generate_rung``'s; ``margins`` adds every position's top-2 logit margin (for ``--generation check``).
    ``resources`` (a dict) gets the worker's ``peak_rss_bytes``."""
    from edgequant.bench.eval_worker import rung_key

    if not paths:
        return {}, {}
    entries = [(p, None) if not isinstance(p, tuple) else p for p in paths]
    req = base_request(ref.path, suite, threads, repack, ref.prompting)
    req.update(op="teacher", reference=str(ref.path), tokens=ref.tokens,
               rungs=[{"path": str(p), **_kv(ct)} if _kv(ct) else str(p) for p, ct in entries])
    if generate:
        req.update(generate=True, margins=margins, **({} if tie_margin is None else {"tie_margin": tie_margin}))
    data = call_worker(req, timeout * len(paths), on_progress)
    if resources is not None:
        resources["peak_rss_bytes"] = data.get("process_peak_rss_bytes")
    keys = {orig: rung_key(str(p), _kv(ct).get("cache_type")) for orig, (p, ct) in zip(paths, entries)}
    outputs = data.get("outputs", {})
    return ({orig: data["scores"][k] for orig, k in keys.items()},
            {orig: outputs[k] for orig, k in keys.items() if k in outputs})


@dataclass
class GenerationDiff:
    """A case whose speculative output differs from plain generation, and where."""
    case_id: str
    position: int            # first output token that differs
    plain: int | None        # plain generation's token there (None: it had stopped)
    speculative: int | None
    how: str                 # how the speculative path got that token: "batched pass" or "decoded"
    margin: float | None     # the rung's top-2 logit margin there in the batched pass, where it has one

    def line(self) -> str:
        why = f"{self.how}, top-2 margin {self.margin:.4g}" if self.margin is not None else self.how
        return f"{self.case_id} at token {self.position} ({why})"


def compare_generations(spec: dict, plain: dict) -> list[GenerationDiff]:
    """The cases whose speculative output (``teacher_pass``) is not plain generation's (``generate_rung``)."""
    plain_cases = {c["id"]: c for c in plain["cases"]}
    diffs = []
    for case in spec["cases"]:
        a, b = case["tokens"], plain_cases[case["id"]]["tokens"]
        if a == b and case["output_b64"] == plain_cases[case["id"]]["output_b64"]:
            continue
        pos = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        info = case.get("spec", {})
        from_pass = info.get("agreed", 0) + (info.get("how") == "departs")
        margins = info.get("margins") or []
        diffs.append(GenerationDiff(case["id"], pos, b[pos] if pos < len(b) else None,
                                    a[pos] if pos < len(a) else None,
                                    "batched pass" if pos < from_pass else "decoded",
                                    margins[pos] if pos < len(margins) and pos < from_pass else None))
    return diffs


def rung_quality(quant: str, suite: Suite, ref: Reference, data: dict,
                 scores: dict[str, dict] | None) -> RungQuality:
    """A rung's figures from its outputs (``generate_rung``) and its token-level scores (``teacher_scores``)."""
    results = case_results(suite, data)
    for cid, sc in (scores or {}).items():
        results[cid].kld, results[cid].top1, results[cid].dp = sc["kld"], sc["top1"], sc.get("dp", [])
    metrics = compute_metrics(suite, results, ref, False, data["gen_tokens"], data["gen_seconds"])
    for m in metrics:
        if m.metric == "eval_tg_tps":
            # how the outputs were made: plain greedy generation, or from the teacher pass (eval_spec)
            m.detail.update(method="speculative" if "speculative" in data else "plain",
                            slots=data.get("slots", EVAL_SLOTS),
                            **({"speculative": data["speculative"]} if "speculative" in data else {}),
                            **({"check": data["check"]} if "check" in data else {}))
    return RungQuality(quant, list(results.values()), metrics, ref.prompting, evaluate_gates(suite, metrics))


def reference_quality(suite: Suite, ref: Reference) -> RungQuality:
    results = dict(ref.cases)
    metrics = compute_metrics(suite, results, ref, True, ref.gen_tokens, ref.gen_seconds)
    return RungQuality(ref.quant, list(results.values()), metrics, ref.prompting, evaluate_gates(suite, metrics))

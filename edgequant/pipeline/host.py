"""The host's stages: benchmark every rung on this host (each in its own process), the ``[sustained]``
series, the eval suite against the reference; each stores its rows and stage resources through the run's
scope.  The model and its artifacts come from ``edgequant.pipeline.prepare``.  Nothing here prints:
progress goes through a ``Reporter``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from edgequant.core.errors import BadInput, RunFailed
from edgequant.devices.host import host_device, host_device_id
from edgequant.pipeline.scope import Reporter, RunScope
from edgequant.profiles import Profile
from edgequant.quantize.ladder import Artifact
from edgequant.results.store import Measurement, RowKey, Store


def _stage(store: Store, run_id: str, stage: str, quant: str, n_params: int | None, seconds: float | None,
           peak: float | None, status: str = "ok", detail: str | None = None, device_id: str | None = None) -> None:
    from edgequant.estimate import stage_row

    store.record_stages(run_id, [stage_row(stage, quant, device_id or host_device_id(), n_params, seconds, peak,
                                           status, False, detail)])


@dataclass
class RungOutcome:
    artifact: Artifact
    status: str
    detail: str | None = None


@dataclass
class BenchOutcome:
    run_id: str
    outcomes: list[RungOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[RungOutcome]:
        # a noisy rung was measured (and is marked), it did not fail
        return [o for o in self.outcomes if o.status not in ("ok", "noisy")]


def artifact_measurements(art: Artifact) -> list[Measurement]:
    return [Measurement("size", art.size_bytes, "bytes"),
            Measurement("bpw", art.bits_per_weight, "bits/weight"),
            Measurement("n_params", art.n_params, "count")]


def bench_variants(profile: Profile, artifacts: list[Artifact], suite=None, prompting: str = "auto") -> list:
    """The variants (context depths x KV cache types, ``profiles.variants``) each GGUF rung is measured in;
    ``[]`` for llama-bench's default alone.  A depth of ``"suite"`` becomes the token length of ``suite``'s
    prompt prefix per format (the built-in suite when none is given), read from the first artifact's
    vocabulary, which also gives the model's training context: a depth that does not fit in it with the
    pp or tg test is refused (``BadInput`` naming ``bench.depths``)."""
    from edgequant.profiles import variants as pv

    settings = profile.bench
    if not settings.has_variants or not artifacts:
        return []
    if not any(settings.depths):    # cache types alone: nothing to resolve or check
        return pv.expand(settings)
    from edgequant.bench import quality
    from edgequant.profiles.suites import load_suite

    suite = suite if suite is not None else load_suite("triage")
    try:
        facts = quality.prompt_facts(artifacts[0].path, suite, prompting, settings.timeout)
    except quality.EvalError as exc:
        raise BadInput(f"profile {profile.name}: field 'bench.depths' cannot be resolved: {exc}") from None
    variants = pv.expand(settings, facts["prefix_tokens"], suite.name)
    n_ctx = int(facts["n_ctx_train"])
    test = max(settings.n_prompt, settings.n_gen)
    deepest = max(v.depth for v in variants)
    if n_ctx > 0 and deepest + test > n_ctx:
        raise BadInput(f"profile {profile.path}: field 'bench.depths' asks for depth {deepest}, which with the "
                       f"{test}-token test exceeds the model's context of {n_ctx} tokens; allowed: depths up to "
                       f"{max(0, n_ctx - test)}")
    return variants


def _variant_rows(art: Artifact, res, v, first: bool) -> list[Measurement]:
    """One variant's rows (``bench.host.VariantResult``, or the ``HostBenchResult`` itself for a plain rung:
    the same figures); the load time belongs to the first (one model load serves every variant)."""
    from edgequant.noise import sample_detail

    rows = artifact_measurements(art)
    if first:
        rows.append(Measurement("load_time", res.load_s, "s", None, 1))
    return rows + [
        Measurement("pp_tps", v.pp.mean, "t/s", v.pp.stddev, v.pp.n, sample_detail(v.pp)),
        Measurement("tg_tps", v.tg.mean, "t/s", v.tg.stddev, v.tg.n, sample_detail(v.tg)),
        Measurement("ttft", v.ttft_ms.mean, "ms", v.ttft_ms.stddev, v.ttft_ms.n),
        Measurement("peak_rss", v.peak_rss_bytes, "bytes"),
        Measurement("peak_rss_anon", v.peak_rss_anon_bytes, "bytes"),
        Measurement("peak_rss_file", v.peak_rss_file_bytes, "bytes"),
    ]


def bench_rungs(scope: RunScope, artifacts: list[Artifact], profile: Profile, measure: Callable | None = None,
                runtime: str = "llama.cpp", params: dict | None = None, suite=None) -> BenchOutcome:
    """Benchmark every artifact on the host, each in its own process; one transaction per rung.

    ``measure`` (default ``bench.host.measure_gguf``) returns a ``HostBenchResult``; ``runtime`` names
    the package whose version the rows record, ``params`` the settings they were measured with.
    A profile with depths or cache types (``bench_variants``; ``suite`` resolves a ``"suite"`` depth)
    measures every variant of a GGUF rung in its one process and stores each as a rung of its own
    (``Q4_K_M@d512,kv=q8_0``), all of them in one transaction."""
    from importlib import metadata

    from edgequant.bench.host import measure_gguf
    from edgequant.core.errors import BenchError
    from edgequant.noise import measure_until_quiet

    store, run_id, reporter = scope.store, scope.run_id, scope.reporter
    measure = measure or measure_gguf
    settings = profile.bench
    params = params or {"runner": "host", **settings.as_params()}
    device, device_id = host_device(), host_device_id()
    runtime_version = metadata.version("llama-cpp-python" if runtime == "llama.cpp" else runtime)
    variants = bench_variants(profile, artifacts, suite) if runtime == "llama.cpp" else []
    stage_name = "bench" if runtime == "llama.cpp" else "bench-onnx"      # its stage_resources rows
    outcome = BenchOutcome(run_id)
    for art in artifacts:
        store.record_artifact(art.record())
        key = scope.key(art, device_id=device_id, device=device, runtime=runtime, runtime_version=runtime_version,
                        params=params)
        keys = [replace(key, quant=v.name(art.quant), params=v.params(params, settings),
                        is_reference=art.is_reference and i == 0) for i, v in enumerate(variants)]
        reporter.rung_started(art.quant)
        t0 = time.perf_counter()
        try:
            art.verify()
            quiet = measure_until_quiet(measure, art.path, settings,
                                        on_phase=lambda phase, q=art.quant: reporter.rung_phase(q, phase),
                                        repack=params.get("repack"),
                                        on_progress=lambda phase, q=art.quant: reporter.rung_phase(q, phase),
                                        **({"variants": variants} if variants else {}))
        except RunFailed as exc:     # a BenchError, or an artifact changed on disk: this rung's failure
            status = getattr(exc, "status", "failed")
            _stage(store, run_id, stage_name, art.quant, art.n_params, time.perf_counter() - t0, None, status,
                   str(exc), device_id)
            if keys:
                store.record_rungs(run_id, [(k, artifact_measurements(art), status, str(exc)) for k in keys])
            else:
                store.record_rung(run_id, key, artifact_measurements(art), status=status, detail=str(exc))
            outcome.outcomes.append(RungOutcome(art, status, str(exc)))
            reporter.rung_done(art.quant, status)
            continue
        res = quiet.result
        peak = getattr(res, "peak_rss_bytes", None)
        _stage(store, run_id, stage_name, art.quant, art.n_params, time.perf_counter() - t0,
               None if peak is None else float(peak), device_id=device_id)
        contention = [m for m in (quiet.measurement(),) if m is not None]
        status, detail = ("noisy", quiet.detail()) if quiet.noisy else ("ok", None)
        if keys and len(res.variants) != len(keys):
            exc = BenchError("failed", f"{art.path.name}: the benchmark worker returned {len(res.variants)} "
                                       f"variants, expected {len(keys)}")
            store.record_rungs(run_id, [(k, artifact_measurements(art), exc.status, str(exc)) for k in keys])
            outcome.outcomes.append(RungOutcome(art, exc.status, str(exc)))
            reporter.rung_done(art.quant, exc.status)
            continue
        if keys:   # one process measured every variant: its contention row and verdict hold for each
            stored = store.record_rungs(run_id, [(k, _variant_rows(art, res, v, i == 0) + contention, status, detail)
                                                 for i, (k, v) in enumerate(zip(keys, res.variants))])
            if any(st != status for st in stored):     # "failed" for a figure that is not a finite number
                status, detail = "failed", "a figure is not a finite number"
            outcome.outcomes.append(RungOutcome(art, status, detail))
            reporter.rung_done(art.quant, status)
            continue
        rows = _variant_rows(art, res, res, True) + contention     # a plain rung is its one variant
        stored = store.record_rung(run_id, key, rows, status=status, detail=detail)
        if stored != status:          # "failed" for a figure that is not a finite number
            status, detail = stored, "a figure is not a finite number"
        outcome.outcomes.append(RungOutcome(art, status, detail))
        reporter.rung_done(art.quant, status)
    return outcome


def sustained_measurements(runs, before: dict | None = None) -> list[Measurement]:
    """The rows of a sustained mode's runs (``bench.sustained``): the last run's tg with every run in its
    detail (the curve), the first run's tg, the drop first -> last in %, and the first run below 90 % of
    the first (0 = never)."""
    from edgequant.bench.sustained import THRESHOLD, summarize

    s = summarize(runs)
    return [Measurement("sustained_tg_tps", s.last_tps, "t/s", None, len(runs),
                        {"runs": [r.to_dict() for r in runs], "before": before or {}}),
            Measurement("sustained_first_tg_tps", s.first_tps, "t/s", None, 1),
            Measurement("sustained_drop", s.drop_pct, "%"),
            Measurement("sustained_below90_run", float(s.below_run or 0), "run", None, None,
                        {"never": s.below_run is None, "threshold": THRESHOLD})]


def sustained_rung(scope: RunScope, artifacts: list[Artifact], profile: Profile, device: dict | None = None,
                   device_id: str | None = None, measure: Callable | None = None, runner: str = "host") -> str:
    """``[sustained]``: back-to-back generation runs of the profile's sustained rung, stored under that
    rung with ``stage = "sustained"`` (its status untouched).  ``measure(art, runs, n_gen, on_progress)``
    returns (runs, reading before); the default measures on this host.  A failure is stored as the
    rung's ``sustained_runs = 0`` row with the reason, and returned ("ok" or the failure's status)."""
    from importlib import metadata

    from edgequant.bench.host import measure_sustained
    from edgequant.core.errors import BenchError

    store, run_id, reporter = scope.store, scope.run_id, scope.reporter
    spec = profile.sustained
    if spec is None:
        return "ok"
    target = spec.target(profile)
    art = next((a for a in artifacts if a.quant == target), None)
    if art is None:
        return "ok"
    n_gen = spec.n_gen or profile.bench.n_gen
    if device is None:
        device, device_id = host_device(), host_device_id()
    if measure is None:
        def measure(a, runs, n, on_progress):
            return measure_sustained(a.path, profile.bench, runs, n, on_progress)
    params = {"runner": runner, "stage": "sustained", "runs": spec.runs, "n_gen": n_gen,
              "threads": profile.bench.resolved_threads() if runner == "host" else profile.bench.threads,
              "repack": profile.bench.resolved_repack() if runner == "host" else profile.bench.repack}
    key = scope.key(
        art, device_id=device_id, device=device, runtime="llama.cpp",
        runtime_version=metadata.version("llama-cpp-python"), params=params)
    label = f"{art.quant} sustained ×{spec.runs}"
    reporter.rung_started(label)
    try:
        runs, before = measure(art, spec.runs, n_gen, lambda p: reporter.rung_phase(label, p))
    except BenchError as exc:
        store.record_rung(run_id, key, [Measurement("sustained_runs", 0.0, "runs", None, None,
                                                    {"error": str(exc), "status": exc.status})], status=None)
        reporter.rung_done(label, exc.status)
        return exc.status
    # a phone's energy per run (device.energy): rows of their own, the run's number in their parameters
    store.record_rungs(run_id, [(key, [Measurement("sustained_runs", float(len(runs)), "runs")]
                                 + sustained_measurements(runs, before), None, None)]
                       + [(replace(key, params={**params, "run": r.run}), sustained_energy_rows(r), None, None)
                          for r in runs if r.energy is not None])
    reporter.rung_done(label, "ok")
    return "ok"


def sustained_energy_rows(run) -> list[Measurement]:
    """One sustained run's energy (``bench.sustained.SustainedRun.energy``) as the plain rungs' rows:
    ``avg_power`` and ``energy_per_token``, or ``energy_per_token`` = 0 with the reason not measured."""
    e = run.energy
    if e.get("not_measured"):
        return [Measurement("energy_per_token", 0.0, "J/token", None, None, {"not_measured": e["not_measured"]})]
    detail = {k: v for k, v in e.items() if k not in ("j_per_token", "watts")}
    n = detail.get("samples")
    return [Measurement("avg_power", e["watts"], "W", None, n, detail),
            Measurement("energy_per_token", e["j_per_token"], "J/token", None, n, detail)]


def quality_measurements(metrics, gates: list[dict]) -> list[Measurement]:
    """The store rows of one rung's quality metrics, plus ``gates_pass`` (the absolute gates: 1 all pass,
    0 not) and ``relative_gates`` (the relative gates: 1 PASS, 0 FAIL, 0.5 INCONCLUSIVE) when it has them."""
    rows = [Measurement(m.metric, m.value, m.unit, m.detail.get("stddev"), m.n, m.detail or None) for m in metrics]
    absolute = [g for g in gates if g.get("kind", "absolute") == "absolute"]
    relative = [g for g in gates if g.get("kind") == "relative"]
    if absolute:
        rows.append(Measurement("gates_pass", 1.0 if all(g["pass"] for g in absolute) else 0.0, "bool", None,
                                len(absolute), {"gates": absolute}))
    if relative:
        from edgequant.bench.quality_stats import combined_verdict

        verdict = combined_verdict(g["verdict"] for g in relative)
        rows.append(Measurement("relative_gates", VERDICT_VALUES[verdict], "verdict", None, len(relative),
                                {"gates": relative, "verdict": verdict}))
    return rows


# how a verdict is stored as a number (the row's detail carries the word)
VERDICT_VALUES = {"PASS": 1.0, "INCONCLUSIVE": 0.5, "FAIL": 0.0}


def quality_rungs(scope: RunScope, artifacts: list[Artifact], profile: Profile, suite, cache_root: Path,
                  prompting: str = "auto", only: set[str] | None = None,
                  extra_params: dict | None = None, stored: set[str] = frozenset(),
                  generation: str = "plain") -> dict[str, str]:
    """Run the eval suite on every rung (reference first) and store its figures and per-case detail.

    ``only``: evaluate just these quants and their KV-cache variants (a resumed run); the reference's outputs
    are always used.  ``stored``: names (``Q4_K_M``, ``Q4_K_M@kv=q8_0``) whose quality is already stored
    (a resumed run), not evaluated again.  ``generation``: how a rung's greedy outputs are made
    (``GENERATION_MODES``): ``plain`` generates each rung in a process of its own, ``speculative`` takes them
    from the teacher pass (``bench.eval_spec``), ``check`` does both, reports the cases that differ and
    stores plain generation's outputs; ``wide`` is plain generation with every case of a format side by side
    (``quality.wide_slots``), the reference's outputs included.  Returns quant -> status ("ok" or how the eval failed).
    """
    from importlib import metadata

    from edgequant.bench import quality
    from edgequant.profiles.variants import BenchVariant, variant_suffix

    store, run_id, reporter = scope.store, scope.run_id, scope.reporter
    settings = profile.bench
    threads = settings.resolved_threads()
    repack = settings.resolved_repack()
    device, device_id = host_device(), host_device_id()
    runtime_version = metadata.version("llama-cpp-python")
    ref_art = next(a for a in artifacts if a.is_reference)
    statuses: dict[str, str] = {}
    if generation not in GENERATION_MODES:
        raise BadInput(f"generation {generation!r}: use one of {', '.join(GENERATION_MODES)}")
    slots = quality.wide_slots(suite) if generation == "wide" else quality.EVAL_SLOTS
    reporter.rung_started(f"{ref_art.quant} reference outputs")
    ref_art.verify()
    t0 = time.perf_counter()
    try:
        ref = quality.reference_outputs(ref_art.path, ref_art.sha256, ref_art.quant, suite, cache_root, threads,
                                        repack, prompting, settings.timeout,
                                        lambda p: reporter.rung_phase(ref_art.quant, p), slots=slots)
    except quality.EvalError as exc:    # nothing to judge the rungs against: the stage is stored, the eval stops
        _stage(store, run_id, "eval-reference", ref_art.quant, ref_art.n_params, time.perf_counter() - t0, None,
               exc.status, str(exc), device_id)
        raise
    if ref.peak_rss_bytes is not None:      # made now, not read from the cache
        _stage(store, run_id, "eval-reference", ref_art.quant, ref_art.n_params, time.perf_counter() - t0,
               ref.peak_rss_bytes, device_id=device_id)
    reporter.step(f"{ref_art.quant} reference outputs: ready in {time.perf_counter() - t0:.1f} s")
    params = {"runner": "host", "stage": "quality", "suite": suite.name, "suite_sha256": suite.sha256,
              "prompting": ref.prompting, "threads": threads, "repack": repack, "decoding": "greedy",
              "n_cases": len(suite.cases), **(extra_params or {})}

    def key(art: Artifact) -> RowKey:
        kv = variant_suffix(art.quant)     # "@kv=q8_0": evaluated with that KV cache type
        extra = BenchVariant(0, kv.split("kv=", 1)[1]).params({}, settings) if kv else {}
        return scope.key(art, device_id=device_id, device=device, runtime="llama.cpp",
                         runtime_version=runtime_version, params={**params, **extra})

    def store_quality(art: Artifact, q, status: str | None = None, detail: str | None = None) -> None:
        # a figure that is not finite makes this rung failed (the store says which); the others are stored
        stored = store.record_rung(run_id, key(art), quality_measurements(q.metrics, q.gates), status=status,
                                   detail=detail, cases=[c.record() for c in q.cases], suite=suite.name)
        statuses[art.quant] = stored or "ok"
        reporter.rung_done(art.quant, stored or "ok")

    def failed(art: Artifact, exc: RunFailed, t0: float) -> None:
        status = getattr(exc, "status", "failed")
        _stage(store, run_id, "eval-generate", art.quant, art.n_params, time.perf_counter() - t0, None,
               status, str(exc), device_id)
        store.record_rung(run_id, key(art), [], status=status, detail=f"quality: {exc}")
        statuses[art.quant] = status
        reporter.rung_done(art.quant, status)

    def plain(art: Artifact, ct: str | None) -> dict:
        t0 = time.perf_counter()
        data = quality.generate_rung(art.path, suite, ref, threads, repack, settings.timeout,
                                     lambda p, quant=art.quant: reporter.rung_phase(quant, p), cache_type=ct,
                                     slots=slots)
        _stage(store, run_id, "eval-generate", art.quant, art.n_params, time.perf_counter() - t0,
               data.get("process_peak_rss_bytes"), device_id=device_id)
        reporter.step(f"{art.quant}: generated in {time.perf_counter() - t0:.1f} s")
        return data

    selected = [a for a in artifacts if (only is None or a.quant in only) and a.quant not in stored]
    # a quantized KV cache changes outputs too: each rung (the reference included) again with every other
    # cache type of the profile, as the variant ``RUNG@kv=TYPE`` (judged against the f16 reference)
    kv_types = [t for t in settings.cache_types if t != "f16"]
    kv_names = {(a.quant, t): BenchVariant(0, t).name(a.quant) for a in artifacts for t in kv_types}
    kv_names = {k: n for k, n in kv_names.items()
                if (only is None or k[0] in only or n in only) and n not in stored}
    units: list[tuple[Artifact, str | None]] = [(a, None) for a in selected] + \
        [(a, t) for t in kv_types for a in artifacts if (a.quant, t) in kv_names]
    # 1. every rung's own outputs, one process per rung
    outputs: list[tuple[Artifact, dict]] = []
    unit_key: dict = {}
    for art, ct in units:
        if ct is not None:     # the variant, stored under its own name; its outputs come from its own cache
            art = replace(art, quant=kv_names[(art.quant, ct)], is_reference=False)
        unit_key[art.quant] = art.path if ct is None else (art.path, ct)
        reporter.rung_started(art.quant)
        if art.is_reference:
            store_quality(art, quality.reference_quality(suite, ref))
            continue
        t0 = time.perf_counter()
        try:
            art.verify()
            outputs.append((art, None if generation == "speculative" else plain(art, ct)))
        except RunFailed as exc:     # an EvalError, or an artifact changed on disk: this rung's failure
            failed(art, exc, t0)
    # 2. token-level scores: the reference's outputs teacher-forced through as many rungs at once as fit;
    # the same pass gives the rungs' outputs (speculative verification, bench.eval_spec) unless plain
    teacher_generates = generation in ("speculative", "check")
    groups = quality.teacher_groups_for((ref_art.path, ref_art.size_bytes),
                                        [(unit_key[a.quant], a.path, a.size_bytes) for a, _ in outputs], suite,
                                        teacher_generates)
    by_path = {unit_key[a.quant]: (a, data) for a, data in outputs}
    for group in groups:
        label = f"KLD vs {ref_art.quant}: " + ", ".join(by_path[p][0].quant for p in group)
        reporter.rung_started(label)
        t0 = time.perf_counter()
        used: dict = {}
        try:
            scores, made = quality.teacher_pass(ref, group, suite, threads, repack, settings.timeout,
                                                lambda p, label=label: reporter.rung_phase(label, p),
                                                generate=teacher_generates, margins=generation == "check",
                                                resources=used)
            _stage(store, run_id, "eval-teacher", label, ref_art.n_params, time.perf_counter() - t0,
                   used.get("peak_rss_bytes"), device_id=device_id)
        except quality.EvalError as exc:
            _stage(store, run_id, "eval-teacher", label, ref_art.n_params, time.perf_counter() - t0, None,
                   exc.status, str(exc), device_id)
            if len(group) > 1:      # several rungs beside the reference may be too many: one at a time
                groups.extend([p] for p in group)
                continue
            art, data = by_path[group[0]]
            if data is None:        # its outputs were to come from this pass: generate them plainly
                try:
                    data = plain(art, group[0][1] if isinstance(group[0], tuple) else None)
                except RunFailed as exc2:
                    failed(art, exc2, time.perf_counter())
                    continue
            store_quality(art, quality.rung_quality(art.quant, suite, ref, data, None), status=exc.status,
                          detail=f"quality: outputs judged, token-level scores failed: {exc}")
            continue
        reporter.step(f"{label}: done in {time.perf_counter() - t0:.1f} s")
        for path in group:
            art, data = by_path[path]
            if path in made:
                data = _generation_outcome(art.quant, made[path], data, reporter)
            store_quality(art, quality.rung_quality(art.quant, suite, ref, data, scores[path]))
    return statuses


# how the eval makes a rung's greedy outputs (quality_rungs): plain generation is the default (speculative
# outputs can differ from it after a near tie; see bench.eval_spec)
GENERATION_MODES = ("speculative", "plain", "check", "wide")


def _generation_outcome(quant: str, spec: dict, plain: dict | None, reporter: Reporter) -> dict:
    """The outputs stored for a rung the teacher pass generated (``spec``): those, or with ``--generation
    check`` plain generation's (``plain``), which decides where the two differ, with the differences."""
    from dataclasses import asdict

    from edgequant.bench import quality

    fast = spec["speculative"]
    how = (f"{fast['agrees']}/{fast['cases']} cases on the fast path, {fast['departs']} departed, "
           f"{fast['near_tie']} near ties, {fast['single_tokens']} tokens decoded one by one")
    if plain is None:
        reporter.step(f"{quant}: outputs from the teacher pass ({how}; {spec['gen_seconds']:.1f} s of decoding)")
        return spec
    diffs = quality.compare_generations(spec, plain)
    line = f"{quant}: speculative outputs equal plain generation on {fast['cases'] - len(diffs)}/{fast['cases']} cases"
    if diffs:
        line += f"; {len(diffs)} differ (plain generation stored): " + "; ".join(d.line() for d in diffs[:5])
        line += " ..." if len(diffs) > 5 else ""
    reporter.step(f"{line} ({how})")
    return {**plain, "check": {"cases": fast["cases"], "differ": len(diffs), "diffs": [asdict(d) for d in diffs],
                               "speculative": fast, "speculative_seconds": spec["gen_seconds"]}}

"""``edgequant bench``, ``eval`` and ``noise``: one stage of a run on its own."""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

import click

from edgequant.cli.app import cli
from edgequant.cli.options import (FORMATS, bench_overrides, cache_option, cache_root, calibration_suite_option,
                                   check_host_threads, command_line, db_option, device_dir_option, host_measuring,
                                   model_options, no_wait_option, open_store, profile_for, quality_options,
                                   runner_dir_option, suite_for)
from edgequant.cli.views import RichReporter, render_run, stderr_console
from edgequant.core.errors import BadInput, EdgequantError
from edgequant.results.lifecycle import recording_partial


@cli.command()
@model_options
@bench_overrides
@db_option
@cache_option
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="How to print the comparison at the end.")
@calibration_suite_option
@no_wait_option
def bench(model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, db, cache_dir, fmt, suite_name,
          no_wait):
    """Benchmark the profile's already-built rungs (GGUF, and ONNX with onnxruntime) on the host and store a run.

    Each rung runs in its own process: model load time, prompt processing
    (pp, default 512 tokens) and generation (tg, default 128 tokens) tokens/s,
    mean ± stddev over the repetitions after a warm-up, time to first token and
    peak RSS (anonymous and mmapped file pages apart).  The method matches
    llama-bench: random tokens, tokenization and sampling excluded.  Build the
    rungs first with `edgequant quantize`.
    """
    from edgequant.pipeline import calibrate
    from edgequant.pipeline import host as pipeline
    from edgequant.pipeline import onnx_rungs as onnx_pipeline
    from edgequant.pipeline import prepare
    from edgequant.pipeline.scope import RunScope

    profile = profile_for(profile_name, threads=threads, n_prompt=n_prompt, n_gen=n_gen,
                          repetitions=repetitions, warmup=warmup)
    check_host_threads(profile)
    cache = cache_root(cache_dir)
    store = open_store(db)
    console = stderr_console()
    with RichReporter(console) as reporter, host_measuring(cache, no_wait, console):
        resolved = prepare.resolve_model(model, cache, reporter)
        imatrix, _, _ = calibrate.for_profile(profile, None, suite_name, "auto", resolved.model_hash, cache, None,
                                              reporter.step)
        artifacts = prepare.cached_ladder(resolved, profile, cache, reporter, imatrix=imatrix)
        onnx_artifacts = onnx_pipeline.cached_onnx(resolved, profile, cache, reporter)
        ckpt = resolved.checkpoint
        run_id = store.start_run(command_line(), profile.name, ckpt.model_id, resolved.model_hash)
        store.set_prep_seconds(run_id, prepare.process_age_seconds())
        scope = RunScope.of(store, run_id, resolved, reporter)
        with recording_partial(store, run_id, "benchmarking"):
            reporter.start_bench(len(artifacts))
            outcome = pipeline.bench_rungs(scope, artifacts, profile,
                                           suite=suite_for(suite_name) if suite_name else None)
            failed = [f"{o.artifact.quant} {o.status}" for o in outcome.failed]
            failed += onnx_on_host(scope, onnx_artifacts, profile)
    store.finish_run(run_id, "complete", f"{len(failed)} rung(s) failed" if failed else None)
    render_run(store, run_id, fmt, None)
    if failed:
        raise EdgequantError(f"{len(failed)} rung(s) did not finish: " + "; ".join(failed), 1)


@cli.command(name="eval")
@model_options
@quality_options
@click.option("--artifact", "artifacts", multiple=True, metavar="GGUF",
              help="Evaluate these GGUF files instead of a profile's ladder; the first is the reference. "
                   "GGUF only: the profile's ONNX rungs are not evaluated then. Repeatable.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads; 0 = one per physical core.")
@db_option
@cache_option
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="How to print the comparison at the end.")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Evaluate only the first N cases of each format (a quick look at a large model; "
                   "the figures then describe that subset).")
@click.option("--generation", type=click.Choice(["plain", "speculative", "check", "wide"]), default="plain",
              show_default=True, help="How each rung's greedy outputs are made: from the KLD pass with the "
              "reference's outputs as the draft (speculative), one plain generation per rung (plain), or both, "
              "reporting the cases that differ and storing plain generation's outputs (check), or plain generation "
              "with every case of a format side by side (wide; an experiment: outputs can differ from plain's).")
@no_wait_option
def eval_(model, profile_name, suite_name, prompting, artifacts, threads, db, cache_dir, fmt, limit, generation,
          no_wait):
    """Run an eval suite on every rung and compare it with the reference.

    Greedy decoding with the same prompts for every rung; the shared prompt
    prefix is decoded once per format.  Reports parse rates per format (Wilson
    95 % intervals), valid-but-wrong per format, gold accuracy (ESI
    exact/adjacent, referral, refusal compliance, over-refusal), agreement with
    the reference's output on the same case, the change with a paired exact
    McNemar test and the flips, llama-perplexity's KLD statistics and top-1
    agreement against the reference's logits, and the suite's and profile's
    gates: absolute (PASS/FAIL) and relative to the reference (non-inferiority:
    PASS, FAIL or INCONCLUSIVE).  Builds the ladder first if
    needed (cached), the profile's ONNX variants included (judged against the
    same GGUF reference), or takes GGUF files with --artifact.
    """
    from edgequant.pipeline import calibrate
    from edgequant.pipeline import host as pipeline
    from edgequant.pipeline import onnx_rungs as onnx_pipeline
    from edgequant.pipeline import prepare
    from edgequant.pipeline.scope import RunScope

    profile = profile_for(profile_name, threads=threads)
    check_host_threads(profile)
    suite = suite_for(suite_name, profile)
    cache = cache_root(cache_dir)
    store = open_store(db)
    console = stderr_console()
    qparams: dict = {}
    onnx_arts: list = []
    with RichReporter(console) as reporter, host_measuring(cache, no_wait, console):
        if artifacts:
            if profile.onnx:
                reporter.step(f"--artifact takes GGUF files: the ONNX rungs of profile {profile.name} are not "
                              f"evaluated (drop --artifact to evaluate the profile's GGUF and ONNX rungs)")
            arts = prepare.artifacts_from_files([Path(a) for a in artifacts], reporter)
            model_id, model_hash = arts[0].path.name, "gguf:" + arts[0].sha256
        else:
            resolved = prepare.resolve_model(model, cache, reporter)
            imatrix, suite, qparams = calibrate.for_profile(profile, suite, suite_name, prompting,
                                                            resolved.model_hash, cache, store, reporter.step)
            arts = prepare.build_ladder(resolved, profile, cache, reporter, imatrix=imatrix)
            onnx_arts = onnx_pipeline.build_onnx(resolved, profile, cache, reporter)
            model_id, model_hash = resolved.checkpoint.model_id, resolved.model_hash
        if limit is not None:
            suite = suite.limited(limit)
            reporter.step(f"--limit {limit}: {len(suite.cases)} cases of suite {suite.name} "
                          f"(the first {limit} of each format)")
        run_id = store.start_run(command_line(), profile.name, model_id, model_hash)
        with recording_partial(store, run_id, "running the eval suite"):
            for art in arts:
                store.record_artifact(art.record())
            reporter.start_bench(len(arts), f"eval {suite.name}")
            scope = RunScope(store, run_id, model_id, model_hash, reporter)
            statuses = pipeline.quality_rungs(scope, arts, profile, suite, cache, prompting, extra_params=qparams,
                                              generation=generation)
            failed = [f"{q} {st}" for q, st in statuses.items() if st != "ok"]
            failed += onnx_quality_on_host(scope, arts, onnx_arts, profile, suite, cache, prompting,
                                           qparams) if onnx_arts else []
    store.finish_run(run_id, "complete", f"{len(failed)} rung(s) failed" if failed else None)
    render_run(store, run_id, fmt, None)
    if failed:
        raise EdgequantError("eval did not finish for: " + "; ".join(failed), 1)


@cli.command()
@model_options
@bench_overrides
@click.option("--rung", "rung_names", multiple=True, metavar="QUANT",
              help="The rung to measure, repeatable: each rung gets its own floor (default: the profile's "
                   "reference, e.g. BF16).")
@click.option("--repeat", type=int, default=5, show_default=True, metavar="N",
              help="How many times the rung is measured (at least 2).")
@click.option("--device", "device_spec", default=None, metavar="SPEC",
              help="Where to measure: this host (`host`, the default) or one phone (SERIAL, HOST:PORT, "
                   "server:SERIAL), leased and measured as `edgequant run --device` does.")
@device_dir_option
@runner_dir_option
@db_option
@cache_option
@calibration_suite_option
def noise(model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, rung_names, repeat, device_spec,
          device_dir, runner_dir, db, cache_dir, suite_name):
    """Measure a rung several times in a row and store this place's A/A noise floor.

    Each measurement loads the rung afresh, as a run does.  The floor of a
    metric is the drop two single runs of the same artifact can show by
    chance: the larger of the medians' range ((largest - smallest) / median)
    and 3.09 x sqrt(2) x their relative standard deviation (a one-in-1000
    chance, were the medians normal), in %.  `edgequant compare` calls a
    speed drop a regression only beyond both the gates' percentage and the
    floor of the rung (else the widest floor stored for the place); a drop in
    between is inconclusive, for `compare --recheck` to decide.  Every
    measurement follows the profile's contention rules; a measurement still
    contended stops the command (exit 1) without storing a floor.  Build the
    rungs first with `edgequant quantize`.  With --device SERIAL the phone is
    leased and the rung measured there as `edgequant run --device` measures
    it; the floor is that phone's.
    """

    from edgequant.pipeline import calibrate
    from edgequant.pipeline import prepare
    from edgequant.noise import Places, measure_noise_floor, place_id

    if repeat < 2:
        raise BadInput(f"--repeat {repeat}: a noise floor needs at least 2 measurements of the rung (5 is a "
                       f"good start)")
    where = place_id(device_spec)
    profile = profile_for(profile_name, threads=threads, n_prompt=n_prompt, n_gen=n_gen,
                          repetitions=repetitions, warmup=warmup)
    rungs = profile.rungs()
    wanted = []
    for name in rung_names or (profile.quant.reference,):
        match = [r for r in rungs if r.upper() == name.upper()]
        if not match:
            raise BadInput(f"--rung {name}: not a rung of profile {profile.name} ({', '.join(rungs)}); pick one of "
                           f"them or pass another --profile")
        if match[0] not in wanted:
            wanted.append(match[0])
    only = replace(profile, quant=replace(profile.quant, types=tuple(t for t in profile.quant.types if t in wanted)))
    cache = cache_root(cache_dir)
    store = open_store(db)
    console = stderr_console()
    floors = []
    with RichReporter(console) as reporter:
        resolved = prepare.resolve_model(model, cache, reporter)
        imatrix, _, _ = calibrate.for_profile(only, None, suite_name, "auto", resolved.model_hash, cache, None,
                                              reporter.step)
        arts = [a for a in prepare.cached_ladder(resolved, only, cache, reporter, imatrix=imatrix)
                if a.quant in wanted]
        with Places(cache, device_dir, runner_dir, say=reporter.step, cooldown=profile.device.cooldown(),
                    folder="noise") as places:
            place = places.get(where, f"--device {device_spec}")
            reporter.start_bench(len(arts), f"noise floor ({repeat}×)")
            for art in arts:
                reporter.rung_started(art.quant)
                floor = measure_noise_floor(art, profile.bench, repeat, place=place,
                                            on_phase=lambda ph, q=art.quant: reporter.rung_phase(q, ph))
                reporter.rung_done(art.quant, "ok")
                store.record_artifact(art.record())     # each rung's floor stored as soon as it is measured
                store.record_noise_floor(floor.device_id, art.quant, art.sha256, floor.params, floor.floors)
                floors.append(floor)
    for floor in floors:
        click.echo(f"A/A noise floor of {floor.device_id} ({floor.quant}, {repeat} measurements, threads "
                   f"{floor.params.get('threads')}):")
        for metric, (pct, medians) in floor.floors.items():
            spread = 100.0 * statistics.stdev(medians) / statistics.median(medians)
            click.echo(f"  {metric}: {pct:.2f} %  (medians {', '.join(f'{m:,.1f}' for m in medians)} t/s; "
                       f"CV {spread:.1f} %)")
    click.echo("`edgequant compare` needs a speed drop beyond it (and beyond the gates' percentage) on this place")


def onnx_on_host(scope, onnx_artifacts: list, profile) -> list[str]:
    """Measure ONNX rungs on the host as every command does (``onnx_pipeline.bench_onnx_rungs``);
    "RUNG STATUS" for each that did not finish."""
    from edgequant.pipeline import onnx_rungs as onnx_pipeline

    if not onnx_artifacts:
        return []
    scope.reporter.start_bench(len(onnx_artifacts), "benchmarking ONNX")
    outcome = onnx_pipeline.bench_onnx_rungs(scope, onnx_artifacts, profile)
    return [f"{o.artifact.quant} {o.status}" for o in outcome.failed]


def onnx_quality_on_host(scope, gguf_artifacts: list, onnx_artifacts: list, profile, suite, cache: Path,
                         prompting: str, qparams: dict) -> list[str]:
    """The eval suite on ONNX rungs on the host, against the GGUF reference (``onnx_pipeline.quality_onnx_rungs``);
    "RUNG quality STATUS" for each that did not finish."""
    from edgequant.pipeline import onnx_rungs as onnx_pipeline

    if not onnx_artifacts:
        return []
    scope.reporter.start_bench(len(onnx_artifacts), f"eval {suite.name} (ONNX)")
    statuses = onnx_pipeline.quality_onnx_rungs(scope, gguf_artifacts, onnx_artifacts, profile, suite, cache,
                                                prompting, qparams)
    return [f"{q} quality {st}" for q, st in statuses.items() if st != "ok"]

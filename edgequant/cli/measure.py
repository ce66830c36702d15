"""``edgequant run``: quantize, benchmark and compare, on the host or on phones."""

from __future__ import annotations

from pathlib import Path

import click

from edgequant.cli.app import cli
from edgequant.cli.options import (FORMATS, bench_overrides, cache_option, cache_root, check_host_threads, db_option,
                                   device_dir_option, force_option, host_measuring, model_options, no_wait_option,
                                   open_store, profile_for, quality_options, runner_dir_option, start_or_resume,
                                   stored_options, suite_for)
from edgequant.cli.views import RichReporter, render_run, stderr_console
from edgequant.core.errors import BadInput, EdgequantError
from edgequant.results.lifecycle import recording_partial


@cli.command()
@model_options
@bench_overrides
@quality_options
@click.option("--no-quality", is_flag=True, help="Skip the eval suite: speed and memory only.")
@click.option("--quality-on-device", is_flag=True,
              help="Run the eval suite on each phone with its llama-completion (greedy, the host eval's prompts), "
                   "against the reference's outputs generated there, instead of on the host. No KLD/top-1 there. "
                   "ONNX rungs' quality is still computed on the host, from the same ONNX file "
                   "(onnxruntime_perf_test only times Run; it cannot generate text).")
@click.option("--device", "device_specs", multiple=True, metavar="SPEC",
              help="Where to benchmark: host (default), a phone (SERIAL, HOST:PORT, server:SERIAL), all, or a "
                   "device pool (pool:NAME|PATH, a TOML listing specs and labels). Repeatable; phones run in "
                   "parallel, each under a lease. Quality is computed on the host from the same GGUF bytes "
                   "(on the phones with --quality-on-device).")
@device_dir_option
@runner_dir_option
@click.option("--cooldown-max-wait", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Longest wait for a phone to cool down before each rung (profile's device.cooldown_max_wait).")
@click.option("--onnx-perf-test", default=None, metavar="PATH",
              help="onnxruntime_perf_test built for Android arm64-v8a (e.g. onnxruntime's "
                   "build/Android/Release/onnxruntime_perf_test, with libonnxruntime.so beside it): measures the "
                   "profile's ONNX rungs on the phones; pushed once to each phone's work directory. Without it "
                   "ONNX rungs on a phone are stored as skipped.")
@click.option("--resume", "resume_id", default=None, metavar="RUN_ID",
              help="Finish a partial run with its own options: rungs already stored are not measured again.")
@click.option("--lease-wait", type=click.FloatRange(min=0), default=300, show_default=True, metavar="SECONDS",
              help="How long to wait for a phone another edgequant process is using before refusing.")
@db_option
@cache_option
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="How to print the comparison at the end.")
@no_wait_option
@force_option
@click.option("--dry-run", is_flag=True,
              help="Print the run's plan (one line per rung x stage x place, with what it is measured with; then "
                   "the disk, memory and time it needs) and exit: nothing is built, no phone is opened, nothing is "
                   "stored. With --resume: what is left.")
@click.pass_context
def run(ctx, model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, suite_name, prompting, no_quality,
        device_specs, device_dir, runner_dir, cooldown_max_wait, resume_id, lease_wait, db, cache_dir, fmt,
        quality_on_device, onnx_perf_test, no_wait, force, dry_run):
    """Quantize, benchmark and compare: the whole job, on the host or on phones.

    Converts the checkpoint to the profile's reference GGUF (BF16) once, makes
    every quant type of the profile, benchmarks each rung in its own process
    (load time, pp and tg tokens/s, TTFT, peak memory), runs the eval suite on
    every rung (parse rates, agreement and KLD against the reference; skip with
    --no-quality) and prints the table.  The profile's [onnx] variants are
    exported, benchmarked with onnxruntime and evaluated the same way.
    Artifacts are cached: a re-run converts and quantizes nothing.

    With --device, the rungs are pushed to the phone(s) and measured there by
    llama.cpp's llama-bench (built from the same llama.cpp revision), after a
    cool-down, with thermal and battery readings stored beside the figures;
    several phones (or a device pool) run in parallel, each under a lease.
    An interrupted run is stored as partial; --resume RUN_ID finishes it.
    """
    if force and not resume_id:
        raise BadInput("--force takes over a run being resumed: use it with --resume RUN_ID")
    if resume_id:
        stored, params = stored_options(ctx, run, open_store(db), resume_id)
        params.update(resume_id=stored["run_id"], db=db or params.get("db"), fmt=fmt, lease_wait=lease_wait,
                      no_wait=no_wait, force=force, dry_run=dry_run)
        return _run(**params)
    return _run(model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, suite_name, prompting,
                no_quality, device_specs, device_dir, runner_dir, cooldown_max_wait, None, db, cache_dir, fmt,
                lease_wait=lease_wait, quality_on_device=quality_on_device, onnx_perf_test=onnx_perf_test,
                no_wait=no_wait, dry_run=dry_run)


# columns of a table written to a file or a pipe (rich's tables are only as wide as their content)


def _onnx_perf_test(path: str | None):
    """The checked ``--onnx-perf-test`` (``bench.onnx_device.LocalPerfTest``), or None without the option."""
    if not path:
        return None
    from edgequant.bench.onnx_device import open_perf_test

    return open_perf_test(path)


def _run(model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, suite_name, prompting, no_quality,
         device_specs, device_dir, runner_dir, cooldown_max_wait, resume_id, db, cache_dir, fmt, lease_wait=300,
         quality_on_device=False, onnx_perf_test=None, no_wait=False, force=False, dry_run=False):
    from dataclasses import replace

    from edgequant import estimate, farm
    from edgequant.devices.select import device_dir as resolve_device_dir
    from edgequant.devices.transport import DeviceError
    from edgequant.pipeline import calibrate, executor
    from edgequant.pipeline import host as pipeline
    from edgequant.pipeline import onnx_rungs as onnx_pipeline
    from edgequant.pipeline import plan as planning
    from edgequant.pipeline.scope import RunScope

    profile = profile_for(profile_name, threads=threads, n_prompt=n_prompt, n_gen=n_gen,
                            repetitions=repetitions, warmup=warmup)
    if cooldown_max_wait is not None:
        profile = replace(profile, device=replace(profile.device, cooldown_max_wait=cooldown_max_wait))
    suite = None if no_quality else suite_for(suite_name, profile)
    on_host, phones, pool_entries = (True, [], {}) if not device_specs else farm.resolve_farm(device_specs)
    if profile.device.energy and on_host:
        raise BadInput(f"profile {profile.path}: field 'device.energy' needs a phone's battery current, which this "
                       f"host cannot read; run with --device SERIAL, or set device.energy = false")
    places = ([planning.PlaceSpec.host()] if on_host else []) + [planning.PlaceSpec.phone(t.serial) for t in phones]
    if dry_run:     # a resumed run's plan leaves out what it holds (the store is only read)
        stored = planning.Stored.read(open_store(db), resume_id) if resume_id else None
        return _dry_run(model, profile, suite, cache_root(cache_dir), db,
                        planning.build(profile, planning.rungs_of_profile(profile), places, suite,
                                       quality_on_device=quality_on_device, stored=stored), bool(phones))
    cache = cache_root(cache_dir)
    store = open_store(db)
    console = stderr_console()
    workdir = resolve_device_dir(device_dir) if phones else None
    perf_test = _onnx_perf_test(onnx_perf_test)
    opened: list[farm.Phone] = []
    executed = None
    host_measures = on_host or (suite is not None and not quality_on_device)   # the eval runs here too
    if host_measures:
        check_host_threads(profile)
    with RichReporter(console) as reporter, host_measuring(cache, no_wait, console, host_measures):
        try:
            # fail fast: a busy (leased), unauthorized or wrong-ABI phone stops nothing half-done
            opened = farm.open_phones(phones, workdir, runner_dir, cache, reporter, lease_wait, pool_entries)
            if perf_test is not None and profile.onnx:
                for phone in opened:   # a build for another OS's linker than a phone's: refused before starting
                    perf_test.require(phone.ctx.os_name, f"device {phone.serial}")
            resolved = pipeline.resolve_model(model, cache, reporter)
            ckpt = resolved.checkpoint
            estimated = estimate.plan_run(resolved, profile, suite, cache, store)
            estimate.check_resources(estimated)       # disk and memory: refused before anything is written
            for line in estimate.format_plan(estimated):
                reporter.step(f"estimate: {line}")
            reporter.expect(estimate.Countdown(estimated))
            run_id = start_or_resume(store, resume_id, profile, resolved, force)
            for phone in opened:
                phone.lease.run = run_id        # written into the lease at its next renewal
            stored = planning.Stored.read(store, run_id)
            with recording_partial(store, run_id, "quantizing",
                                   f"`edgequant run --resume {run_id}` finishes it") as stage:
                imatrix, suite, qparams = calibrate.for_profile(profile, suite, suite_name, prompting,
                                                                resolved.model_hash, cache, store, reporter.step)
                killed: list = []      # rungs whose quantization was killed (OOM): stored, the others go on
                artifacts = pipeline.build_ladder(resolved, profile, cache, reporter, imatrix=imatrix, failed=killed)
                pipeline.record_build_stages(store, run_id, artifacts)
                onnx_arts = onnx_pipeline.build_onnx(resolved, profile, cache, reporter)
                onnx_pipeline.record_onnx_stages(store, run_id, onnx_arts)
                artifacts += onnx_arts
                if not resume_id:
                    store.set_prep_seconds(run_id, pipeline.process_age_seconds())
                build_failed = pipeline.record_build_failures(store, run_id, ckpt.model_id, resolved.model_hash,
                                                              ckpt.n_params_estimate, killed)
                run_plan = planning.build(profile, planning.rungs_of(artifacts), places, suite,
                                          quality_on_device=quality_on_device, stored=stored)
                inputs = executor.RunInputs(profile, artifacts, cache, suite, prompting, qparams, variant_suite=suite,
                                            quality_on_device=quality_on_device, on_host=on_host,
                                            perf_test=perf_test)
                executed = executor.execute(run_plan, RunScope.of(store, run_id, resolved, reporter), inputs,
                                            phones=opened, runner_dir=runner_dir, console=console,
                                            on_stage=lambda now: setattr(stage, "now", now))
        except DeviceError as exc:
            raise EdgequantError(str(exc), 1) from None
        finally:
            farm.close_phones(opened)
    failed, lost = build_failed + executed.failed, executed.lost
    if lost:
        detail = "; ".join(f"{p.serial}: {p.failure}" for p in lost)
        store.finish_run(run_id, "partial", detail)
        render_run(store, run_id, fmt, None)
        raise EdgequantError(f"{len(lost)} phone(s) failed ({detail}); the finished rungs are stored in run "
                             f"{run_id}, marked partial; `edgequant run --resume {run_id}` measures the rest", 1)
    store.finish_run(run_id, "complete", f"{len(failed)} rung(s) failed" if failed else None)
    render_run(store, run_id, fmt, None)
    console.print(f"[dim]stored as run {run_id} in {store.path}; "
                  f"`edgequant report {run_id}` shows it again[/dim]")
    if failed:
        raise EdgequantError(f"{len(failed)} rung stage(s) did not finish: " + "; ".join(failed), 1)


def _dry_run(model, profile, suite, cache: Path, db: str | None, run_plan, phones: bool) -> None:
    """``run --dry-run``: the plan's cells, then the disk, memory and time they need, on stdout.  Nothing is
    built, no phone is opened, nothing is stored (a results database that does not exist yet is not made);
    the model is resolved for its size (a local checkpoint is fingerprinted, the embedded default
    materialized once), and phones are estimated at this host's speed."""
    from edgequant import estimate
    from edgequant.core.paths import default_db
    from edgequant.pipeline import host as pipeline

    click.echo(f"plan of profile {profile.name}: {len(run_plan.cells)} cell(s) (stage, rung, runtime, place)")
    for line in run_plan.lines():
        click.echo("  " + line)
    path = db or default_db()
    store = open_store(db) if "://" in str(path) or Path(path).exists() else None
    with RichReporter(stderr_console()) as reporter:
        resolved = pipeline.resolve_model(model, cache, reporter)
    estimated = estimate.plan_run(resolved, profile, suite, cache, store)
    click.echo(f"estimate for {resolved.checkpoint.model_id}"
               + (" (the phones' stages at this host's speed)" if phones else "") + ":")
    for line in estimate.format_plan(estimated):
        click.echo("  " + line)
    estimate.check_resources(estimated)

"""``edgequant run``: quantize, benchmark and compare, on the host or on phones."""

from __future__ import annotations

from pathlib import Path

import click

from edgequant.cli.app import cli
from edgequant.cli.options import (FORMATS, bench_overrides, cache_option, cache_root, command_line, db_option,
                                   device_dir_option, force_option, model_options, no_wait_option, open_store,
                                   profile_for, quality_options, runner_dir_option, stored_options, suite_for,
                                   takeover_notice)
from edgequant.cli.views import RichReporter, render_run, stderr_console
from edgequant.core.errors import BadInput, EdgequantError


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


def _run(model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, suite_name, prompting, no_quality,
         device_specs, device_dir, runner_dir, cooldown_max_wait, resume_id, db, cache_dir, fmt, lease_wait=300,
         quality_on_device=False, onnx_perf_test=None, no_wait=False, force=False, dry_run=False):
    """Parse the options into a ``pipeline.run.RunRequest``, run it inside the progress view, render the run
    and turn its outcome into the exit."""
    from dataclasses import replace

    from edgequant.pipeline import run as runs

    profile = profile_for(profile_name, threads=threads, n_prompt=n_prompt, n_gen=n_gen,
                          repetitions=repetitions, warmup=warmup)
    if cooldown_max_wait is not None:
        profile = replace(profile, device=replace(profile.device, cooldown_max_wait=cooldown_max_wait))
    suite = None if no_quality else suite_for(suite_name, profile)
    request = runs.RunRequest(model, profile, suite, suite_name, prompting, cache_dir, command_line(),
                              device_specs=tuple(device_specs or ()), device_dir=device_dir, runner_dir=runner_dir,
                              resume_id=resume_id, lease_wait=lease_wait, quality_on_device=quality_on_device,
                              onnx_perf_test=onnx_perf_test, no_wait=no_wait, force=force, notice=takeover_notice)
    if dry_run:     # a resumed run's plan leaves out what it holds (the store is only read)
        run_plan, where = runs.plan(request, open_store(db) if resume_id else None)
        return _dry_run(model, profile, suite, cache_root(cache_dir), db, run_plan, bool(where.phones))
    where = runs.places(request)
    request = replace(request, cache_root=cache_root(cache_dir))     # made if missing, checked writable
    store, console = open_store(db), stderr_console()
    with RichReporter(console) as reporter:
        outcome = runs.run(request, store, reporter, console, where)
    render_run(store, outcome.run_id, fmt, None)
    if outcome.lost:
        raise EdgequantError(f"{len(outcome.lost)} phone(s) failed ({outcome.lost_detail()}); the finished rungs "
                             f"are stored in run {outcome.run_id}, marked partial; "
                             f"`edgequant run --resume {outcome.run_id}` measures the rest", 1)
    console.print(f"[dim]stored as run {outcome.run_id} in {store.path}; "
                  f"`edgequant report {outcome.run_id}` shows it again[/dim]")
    if outcome.failed:
        raise EdgequantError(f"{len(outcome.failed)} rung stage(s) did not finish: " + "; ".join(outcome.failed), 1)


def _dry_run(model, profile, suite, cache: Path, db: str | None, run_plan, phones: bool) -> None:
    """``run --dry-run``: the plan's cells, then the disk, memory and time they need, on stdout.  Nothing is
    built, no phone is opened, nothing is stored (a results database that does not exist yet is not made);
    the model is resolved for its size (a local checkpoint is fingerprinted, the embedded default
    materialized once), and phones are estimated at this host's speed."""
    from edgequant import estimate
    from edgequant.core.paths import default_db
    from edgequant.pipeline import prepare

    click.echo(f"plan of profile {profile.name}: {len(run_plan.cells)} cell(s) (stage, rung, runtime, place)")
    for line in run_plan.lines():
        click.echo("  " + line)
    path = db or default_db()
    store = open_store(db) if "://" in str(path) or Path(path).exists() else None
    with RichReporter(stderr_console()) as reporter:
        resolved = prepare.resolve_model(model, cache, reporter)
    estimated = estimate.plan_run(resolved, profile, suite, cache, store)
    click.echo(f"estimate for {resolved.checkpoint.model_id}"
               + (" (the phones' stages at this host's speed)" if phones else "") + ":")
    for line in estimate.format_plan(estimated):
        click.echo("  " + line)
    estimate.check_resources(estimated)

"""``edgequant run``: quantize, benchmark and compare, on the host or on phones."""

from __future__ import annotations

import click

from edgequant.cli.app import cli
from edgequant.cli.options import (FORMATS, bench_overrides, cache_option, cache_root, check_host_threads, db_option,
                                   device_dir_option, force_option, host_measuring, model_options, no_wait_option,
                                   open_store, profile_for, quality_options, runner_dir_option, start_or_resume,
                                   stored_options, suite_for)
from edgequant.cli.stages import onnx_on_host, onnx_quality_on_host
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
@click.pass_context
def run(ctx, model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, suite_name, prompting, no_quality,
        device_specs, device_dir, runner_dir, cooldown_max_wait, resume_id, lease_wait, db, cache_dir, fmt,
        quality_on_device, onnx_perf_test, no_wait, force):
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
                      no_wait=no_wait, force=force)
        return _run(**params)
    return _run(model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, suite_name, prompting,
                no_quality, device_specs, device_dir, runner_dir, cooldown_max_wait, None, db, cache_dir, fmt,
                lease_wait=lease_wait, quality_on_device=quality_on_device, onnx_perf_test=onnx_perf_test,
                no_wait=no_wait)


ONNX_NO_PERF_TEST = ("no onnxruntime_perf_test for the phone: pass --onnx-perf-test PATH (onnxruntime_perf_test "
                     "built for Android arm64-v8a; see the README, 'ONNX rungs')")


def _onnx_perf_test(path: str | None):
    """The checked ``--onnx-perf-test`` (``bench.onnx_device.LocalPerfTest``), or None without the option."""
    if not path:
        return None
    from edgequant.bench.onnx_device import open_perf_test

    return open_perf_test(path)


def _has_sustained(store, run_id: str, device_id: str) -> bool:
    """Whether a resumed run already holds its [sustained] rows for this device."""
    return any(r["params"].get("stage") == "sustained" and r["device_id"] == device_id
               for r in store.measurements(run_id))


def _run(model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, suite_name, prompting, no_quality,
         device_specs, device_dir, runner_dir, cooldown_max_wait, resume_id, db, cache_dir, fmt, lease_wait=300,
         quality_on_device=False, onnx_perf_test=None, no_wait=False, force=False):
    from dataclasses import replace

    from edgequant import calibrate, device_quality, device_run, farm, onnx_pipeline, pipeline
    from edgequant.devices.host import host_device_id
    from edgequant.devices.select import device_dir as resolve_device_dir
    from edgequant.devices.transport import DeviceError
    from edgequant.profiles.variants import base_quant

    profile = profile_for(profile_name, threads=threads, n_prompt=n_prompt, n_gen=n_gen,
                          repetitions=repetitions, warmup=warmup)
    if cooldown_max_wait is not None:
        profile = replace(profile, device=replace(profile.device, cooldown_max_wait=cooldown_max_wait))
    suite = None if no_quality else suite_for(suite_name, profile)
    cache = cache_root(cache_dir)
    store = open_store(db)
    console = stderr_console()
    on_host, phones, pool_entries = (True, [], {}) if not device_specs else farm.resolve_farm(device_specs)
    if profile.device.energy and on_host:
        raise BadInput(f"profile {profile.path}: field 'device.energy' needs a phone's battery current, which this "
                       f"host cannot read; run with --device SERIAL, or set device.energy = false")
    workdir = resolve_device_dir(device_dir) if phones else None
    perf_test = _onnx_perf_test(onnx_perf_test)
    opened: list[farm.Phone] = []
    lost: list[farm.Phone] = []
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
            run_id = start_or_resume(store, resume_id, profile, resolved, force)
            for phone in opened:
                phone.lease.run = run_id        # written into the lease at its next renewal
            # a rung measured in several variants (depths, cache types: RUNG@d512) is done when they are
            done = {(base_quant(s["quant"]), s["device_id"]) for s in store.rung_statuses(run_id)}
            with recording_partial(store, run_id, "quantizing",
                                   f"`edgequant run --resume {run_id}` finishes it") as stage:
                imatrix, suite, qparams = calibrate.for_profile(profile, suite, suite_name, prompting,
                                                                resolved.model_hash, cache, store, reporter.step)
                artifacts = pipeline.build_ladder(resolved, profile, cache, reporter, imatrix=imatrix)
                onnx_artifacts = onnx_pipeline.build_onnx(resolved, profile, cache, reporter)
                if not resume_id:
                    store.set_prep_seconds(run_id, pipeline.process_age_seconds())
                failed: list[str] = []
                if on_host:
                    stage.now = "benchmarking"
                    host_id = host_device_id()
                    todo = [a for a in artifacts if (a.quant, host_id) not in done]
                    reporter.start_bench(len(todo))
                    outcome = pipeline.bench_rungs(store, run_id, ckpt.model_id, resolved.model_hash, todo,
                                                   profile, reporter, suite=suite)
                    failed += [f"{o.artifact.quant} {o.status}" for o in outcome.failed]
                    todo = [a for a in onnx_artifacts if (a.quant, host_id) not in done]
                    failed += onnx_on_host(store, run_id, resolved, todo, profile, reporter)
                    if profile.sustained is not None and not _has_sustained(store, run_id, host_id):
                        stage.now = "sustained runs"
                        status = pipeline.sustained_rung(store, run_id, ckpt.model_id, resolved.model_hash,
                                                         artifacts, profile, reporter)
                        failed += [f"{profile.sustained.target(profile)} sustained {status}"] if status != "ok" else []
                if opened:
                    stage.now = "benchmarking on the phones"
                    shared = farm.LockedStore(store)    # the phones' threads write through one lock

                    def device_job(dctx, todo, phone_reporter):
                        """Everything measured on one opened phone (``dctx``) for the rungs in ``todo``; the
                        farm calls it from that phone's thread, under its lease, one rung at a time."""
                        benched = {(base_quant(s["quant"]), s["device_id"]) for s in shared.rung_statuses(run_id)}
                        gguf = [a for a in todo if a.quant not in onnx_quants]
                        onnx = [a for a in todo if a.quant in onnx_quants and (a.quant, dctx.device_id) not in benched]
                        outcome = device_run.bench_rungs_on_device(
                            shared, run_id, ckpt.model_id, resolved.model_hash,
                            [a for a in gguf if (a.quant, dctx.device_id) not in benched], profile, dctx,
                            phone_reporter, suite=suite)
                        if profile.sustained is not None and gguf and not _has_sustained(shared, run_id,
                                                                                         dctx.device_id):
                            status = device_run.sustained_on_device(shared, run_id, ckpt.model_id,
                                                                    resolved.model_hash, artifacts, profile, dctx,
                                                                    phone_reporter)
                            outcome.outcomes += [pipeline.RungOutcome(a, f"sustained {status}") for a in gguf
                                                 if status != "ok" and a.quant == profile.sustained.target(profile)]
                        if quality_on_device and suite is not None and gguf:
                            statuses = device_quality.quality_rungs_on_device(
                                shared, run_id, ckpt.model_id, resolved.model_hash, artifacts, profile, suite, dctx,
                                phone_reporter, prompting=prompting, extra_params=qparams,
                                only={a.quant for a in gguf})
                            outcome.outcomes += [pipeline.RungOutcome(a, f"quality {statuses[a.quant]}") for a in gguf
                                                 if statuses.get(a.quant, "ok") != "ok"]
                        if onnx:
                            outcome.outcomes += device_run.bench_onnx_rungs_on_device(
                                shared, run_id, ckpt.model_id, resolved.model_hash, onnx, profile, dctx,
                                phone_reporter, cache / "onnx-device-sets", perf_test,
                                skip_reason=ONNX_NO_PERF_TEST).outcomes
                        return outcome

                    evaluated = {(r["quant"], r["device_id"]) for r in store.measurements(run_id)
                                 if r["params"].get("where") == "device"} if quality_on_device else None
                    onnx_quants = {a.quant for a in onnx_artifacts}
                    plan = {p.serial: [a for a in artifacts if (a.quant, p.ctx.device_id) not in done
                                       or (evaluated is not None and (a.quant, p.ctx.device_id) not in evaluated)]
                            + [a for a in onnx_artifacts if (a.quant, p.ctx.device_id) not in done]
                            for p in opened}
                    reporter.pause()
                    result = farm.run_farm(opened, plan, device_job, runner_dir=runner_dir, cache_root=cache,
                                           console=console)
                    farm.render_summary(result, console)
                    failed += result.failed_rungs
                    lost = result.lost
                if suite is not None:
                    stage.now = "running the eval suite"
                    have = {r["quant"] for r in store.measurements(run_id)
                            if r["params"].get("stage") == "quality" and r["params"].get("where") != "device"}
                    todo = [a for a in artifacts if a.quant not in have]
                    if todo and (on_host or not quality_on_device):
                        reporter.start_bench(len(todo), f"eval {suite.name}")
                        statuses = pipeline.quality_rungs(store, run_id, ckpt.model_id, resolved.model_hash,
                                                          artifacts, profile, suite, cache, reporter, prompting,
                                                          only={a.quant for a in todo}, extra_params=qparams)
                        failed += [f"{q} quality {st}" for q, st in statuses.items() if st != "ok"]
                    todo = [a for a in onnx_artifacts if a.quant not in have]
                    if todo and quality_on_device and not on_host:  # the phones' eval generates with llama.cpp
                        reporter.step("ONNX rungs: quality computed on the host; onnxruntime_perf_test only times Run")
                    failed += onnx_quality_on_host(store, run_id, resolved, artifacts, todo, profile, suite, cache,
                                                   reporter, prompting, qparams)
        except DeviceError as exc:
            raise EdgequantError(str(exc), 1) from None
        finally:
            farm.close_phones(opened)
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

"""``edgequant tune``: the smallest rung that passes every gate, measured one candidate at a time."""

from __future__ import annotations

import time as _time

import click

from edgequant.cli.app import cli
from edgequant.cli.options import (cache_option, cache_root, check_host_threads, db_option, device_dir_option,
                                   force_option, host_measuring, no_wait_option, open_store, profile_for,
                                   quality_options, runner_dir_option, start_or_resume, stored_options, suite_for)
from edgequant.cli.views import RichReporter, stderr_console, tune_table
from edgequant.core.errors import BadInput, EdgequantError
from edgequant.results.lifecycle import recording_partial


def _tune_device(spec: str) -> list:
    """The phone ``tune --device SPEC`` measures speed on (none for ``host``); one line for anything else."""
    from edgequant.pipeline import device_run

    if spec.strip() == "host":
        return []
    if spec.strip().startswith("pool:"):
        raise BadInput(f"--device {spec}: tune measures on one device; name one phone (SERIAL, HOST:PORT, "
                       "server:SERIAL) or host")
    on_host, phones = device_run.resolve_devices((spec,))
    if on_host or len(phones) != 1:
        names = ", ".join(p.serial for p in phones)
        raise BadInput(f"--device {spec} names {len(phones)} phones ({names}); tune measures on one device: "
                       "name one phone (SERIAL, HOST:PORT, server:SERIAL) or host")
    return phones


@cli.command()
@click.option("--device", default="host", show_default=True, metavar="SPEC",
              help="Where each candidate's speed and memory are measured: host, or one phone (SERIAL, HOST:PORT, "
                   "server:SERIAL), by the on-device llama-bench runner as `run --device` does; --min-tg then "
                   "applies to the phone's tg. Quality is always computed on the host from the same GGUF bytes.")
@device_dir_option
@runner_dir_option
@click.option("--gate", "gate_texts", multiple=True, metavar="METRIC>=VALUE",
              help="A gate every candidate must pass, e.g. 'xml_parse_rate>=0.95' (repeatable). "
                   "Default: the suite's gates.")
@click.option("--min-tg", type=float, default=None, help="Also require at least this many generated tokens/s.")
@click.option("--max-size", default=None, metavar="SIZE", help="Do not measure candidates over SIZE (e.g. 300M, 1.5G).")
@click.option("--types", "types_csv", default=None, metavar="T1,T2,...",
              help="Base quant types to walk, high to low precision (default: Q8_0,Q6_K,Q5_K_M,Q4_K_M,IQ4_XS,"
                   "Q3_K_M,Q2_K).")
@click.option("--variants", "variants_csv", default=None, metavar="V1,V2,...",
              help="Modifier sets tried with every type, '' for the stock type (default: "
                   "',+imatrix,+emb=Q8_0,+imatrix+emb=Q8_0').")
@click.option("--model", default=None, metavar="PATH|HF_REPO",
              help="bf16 checkpoint folder or hub id. Default: the embedded Gemma 3 270M.")
@click.option("--profile", "profile_name", default="quick", show_default=True, metavar="NAME|PATH",
              help="Profile whose bench settings measure each candidate (its types are not used).")
@quality_options
@click.option("--resume", "resume_id", default=None, metavar="RUN_ID",
              help="Finish a partial tune with its own options: candidates already measured are not measured "
                   "again.")
@db_option
@cache_option
@no_wait_option
@force_option
@click.pass_context
def tune(ctx, device, device_dir, runner_dir, gate_texts, min_tg, max_size, types_csv, variants_csv, model,
         profile_name, suite_name, prompting, resume_id, db, cache_dir, no_wait, force):
    """Find the smallest rung that passes every gate (then the fastest), with the evidence.

    Walks base types from high to low precision, each with the importance
    matrix on and off and a few per-tensor overrides, and measures each
    candidate: speed and memory on the host, or with --device on that phone
    (pushed and run by llama-bench, as `edgequant run --device` does), and
    quality on the host, on the suite's evaluation half (the other half
    calibrates the imatrix).  A candidate larger than one already passing is
    not measured; a variant that failed the quality gates is not retried at
    lower precision.  The search is stored as an ordinary run (`edgequant
    report` and `pick` show it, under the phone with --device).  An
    interrupted search is stored as partial; --resume RUN_ID finishes it.
    """
    if resume_id:
        stored, params = stored_options(ctx, tune, open_store(db), resume_id)
        params.update(resume_id=stored["run_id"], db=db or params.get("db"), no_wait=no_wait, force=force)
        return _tune(**params)
    if force:
        raise BadInput("--force takes over a run being resumed: use it with --resume RUN_ID")
    return _tune(device, device_dir, runner_dir, gate_texts, min_tg, max_size, types_csv, variants_csv, model,
                 profile_name, suite_name, prompting, None, db, cache_dir, no_wait)


def _tune(device, device_dir, runner_dir, gate_texts, min_tg, max_size, types_csv, variants_csv, model,
          profile_name, suite_name, prompting, resume_id, db, cache_dir, no_wait=False, force=False):
    from edgequant import farm
    from edgequant.pipeline import calibrate, device_run
    from edgequant.pipeline import prepare
    from edgequant.bench import tune as tuning
    from edgequant.devices.select import device_dir as resolve_device_dir
    from edgequant.devices.transport import DeviceError
    from edgequant.profiles.suites import parse_gate

    t0 = _time.monotonic()
    phones = _tune_device(device)
    profile = profile_for(profile_name)
    check_host_threads(profile, f"profile {profile.name}: bench.threads")
    suite = suite_for(suite_name)
    gates = [parse_gate(g, f"--gate {g!r}") for g in gate_texts] or list(suite.gates)
    if not gates and min_tg is None:
        raise BadInput(f"no gates: suite {suite.name} has none; pass --gate METRIC>=VALUE (or --min-tg)")
    size_limit = tuning.parse_size(max_size) if max_size is not None else None
    types = tuple(t.strip().upper() for t in types_csv.split(",") if t.strip()) if types_csv else None
    variants = tuple(v.strip() for v in variants_csv.split(",")) if variants_csv is not None else None
    if types:
        from edgequant.profiles import FLOAT_TYPES, quant_types

        known = set(quant_types()) - FLOAT_TYPES
        bad = [t for t in types if t not in known]
        if bad:
            raise BadInput(f"--types: unknown quant type {bad[0]!r}; valid types: {', '.join(sorted(known))}")
    if variants is not None:
        from edgequant.profiles.rungs import parse_rung

        for v in variants:
            parse_rung("Q8_0" + v, f"--variants {v!r}")
    calibrate.Calibration.of(suite, prompting)  # a suite too small to split fails here, before any work
    workdir = resolve_device_dir(device_dir) if phones else None
    cache = cache_root(cache_dir)
    store = open_store(db)
    console = stderr_console()
    opened: list = []
    with RichReporter(console) as reporter, host_measuring(cache, no_wait, console):  # quality is measured here
        try:
            # the phone first (lease, facts, runner): a busy or unreachable one stops nothing half-done
            opened = farm.open_phones(phones, workdir, runner_dir, cache, reporter)
            phone = opened[0] if opened else None
            speed_on = phone.ctx.device_id if phone is not None else "this host"
            resolved = prepare.resolve_model(model, cache, reporter)
            run_id = start_or_resume(store, resume_id, profile, resolved, force)
            if phone is not None:
                phone.lease.run = run_id
            with recording_partial(store, run_id, "tuning", f"`edgequant tune --resume {run_id}` finishes it",
                                   lost=(device_run.DeviceLost, DeviceError),
                                   lost_note=f"the candidates measured so far are stored in run {run_id}, "
                                             f"marked partial; `edgequant tune --resume {run_id}` finishes it"):
                result, ref_failures = calibrate.tune(store, run_id, resolved, profile, suite, prompting, gates,
                                                      cache, reporter, min_tg, size_limit, types, variants, phone)
        except DeviceError as exc:
            raise EdgequantError(str(exc), 1) from None
        finally:
            farm.close_phones(opened)
    seconds = _time.monotonic() - t0
    tune_table(result, gates, speed_on)
    n = len(result.measured)
    if result.best is None:
        msg = tuning.no_pass_message(result, gates)
        if ref_failures:
            msg += f" (the reference itself fails {', '.join(ref_failures)})"
        store.finish_run(run_id, "complete", f"tune: {msg}")
        console.print(f"[dim]tune measured {n} of {len(result.tried)} candidates in {seconds:.0f} s; "
                      f"stored as run {run_id}[/dim]")
        raise BadInput(msg)
    b = result.best
    store.finish_run(run_id, "complete", f"tune chose {b.name}")
    click.echo(f"chosen: {b.name} · {b.size_bytes / 2**20:,.1f} MiB · tg {b.measured.tg_tps or 0:.1f} t/s on "
               f"{speed_on} · "
               f"{b.measured and 'passes ' + ', '.join(str(g) for g in gates)}")
    console.print(f"[dim]tune measured {n} of {len(result.tried)} candidates in {seconds:.0f} s; stored as run "
                  f"{run_id}; `edgequant report {run_id}` shows it again[/dim]")

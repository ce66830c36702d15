"""A whole run as one library call: ``edgequant run`` parses its options into a ``RunRequest`` and calls
``run`` inside its progress view; ``plan`` is the same run's cells without running them (``--dry-run``).

``run`` holds the run's lifecycle: the places (``--device``: the host, phones, pools) and the checks that
refuse a run before anything is written (energy on the host, threads, the phones' leases and ABI, the ONNX
perf test's linker, disk and memory); the model and the estimate; the run row (started, or resumed); then,
with the run marked ``partial`` if it stops half-way (``results.lifecycle.recording_partial``): calibration,
the GGUF ladder and the ONNX rungs with their build stages and failures, the plan of cells and its
execution on the host and the phones; the phones closed; the run finished ``complete`` or, with a phone
lost, ``partial``.  What the outcome means for the user (a table, the exit code) is the caller's.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgequant import estimate, farm
from edgequant.core.errors import BadInput, EdgequantError
from edgequant.pipeline import calibrate, executor, onnx_rungs, prepare
from edgequant.pipeline import plan as planning
from edgequant.pipeline.scope import RunScope
from edgequant.results.lifecycle import recording_partial


@dataclass
class RunRequest:
    """A run's options, parsed (``edgequant run``'s, or a resumed run's stored ones)."""

    model: str | None                  # None: the embedded default; a folder; a hub id
    profile: Any                       # profiles.Profile, with the command line's overrides
    suite: Any                         # the eval suite, or None (--no-quality)
    suite_name: str
    prompting: str
    cache_root: Path | str | None      # the cache folder (the CLI's checked one before ``run``)
    command: str                       # the command line stored with a new run
    device_specs: tuple = ()           # --device; empty: this host alone
    device_dir: str | None = None
    runner_dir: str | None = None
    resume_id: str | None = None
    lease_wait: float = 300
    quality_on_device: bool = False
    onnx_perf_test: str | None = None  # the --onnx-perf-test path
    no_wait: bool = False
    force: bool = False
    notice: Callable[[str], None] = field(default=lambda message: None)   # a line for the user (a takeover)


@dataclass
class Places:
    """Where a run measures: the host or not, the phones' targets and their pool entries."""

    on_host: bool
    phones: list
    pool_entries: dict

    def specs(self) -> list[planning.PlaceSpec]:
        return (([planning.PlaceSpec.host()] if self.on_host else [])
                + [planning.PlaceSpec.phone(t.serial) for t in self.phones])


@dataclass
class RunOutcome:
    run_id: str
    failed: list[str]                  # "RUNG [STAGE ]STATUS" of every build or cell that did not end ok
    lost: list                         # farm.Phone given up (the run is stored partial)

    def lost_detail(self) -> str:
        return "; ".join(f"{p.serial}: {p.failure}" for p in self.lost)


def places(request: RunRequest) -> Places:
    """The run's places (``--device`` resolved, pools expanded); a profile measuring energy on the host is
    refused."""
    on_host, phones, entries = (True, [], {}) if not request.device_specs else farm.resolve_farm(
        request.device_specs)
    profile = request.profile
    if profile.device.energy and on_host:
        raise BadInput(f"profile {profile.path}: field 'device.energy' needs a phone's battery current, which this "
                       f"host cannot read; run with --device SERIAL, or set device.energy = false")
    return Places(on_host, phones, entries)


def plan(request: RunRequest, store=None) -> tuple[planning.Plan, Places]:
    """The run's cells and places, without running anything (``run --dry-run``): with ``request.resume_id``,
    what ``store`` (only read) does not hold yet."""
    where = places(request)
    stored = planning.Stored.read(store, request.resume_id) if request.resume_id else None
    profile = request.profile
    return planning.build(profile, planning.rungs_of_profile(profile), where.specs(), request.suite,
                          quality_on_device=request.quality_on_device, stored=stored), where


def host_measures(request: RunRequest, where: Places) -> bool:
    """Whether this host measures: its own speed, or the eval (which runs here unless on the phones)."""
    return where.on_host or (request.suite is not None and not request.quality_on_device)


def start_or_resume(store, resume_id: str | None, profile, resolved, command: str, force: bool = False,
                    notice: Callable[[str], None] = lambda message: None) -> str:
    """A new run's id (stored with ``command``), or ``resume_id`` marked running again once it is known to
    measure this checkpoint (a run left running by a process that is gone is taken over, with one
    ``notice`` saying so)."""
    if not resume_id:
        return store.start_run(command, profile.name, resolved.checkpoint.model_id, resolved.model_hash)
    stored = store.resume_run(resume_id, force=force)
    if stored.get("takeover"):
        notice(stored["takeover"])
    if stored.get("model_hash") and stored["model_hash"] != resolved.model_hash:
        raise BadInput(f"run {resume_id} measured another checkpoint ({stored['model_hash'][:12]}…) than "
                       f"{resolved.checkpoint.path} has now ({resolved.model_hash[:12]}…); start a new run")
    return resume_id


def check_host_threads(profile, option: str = "--threads") -> None:
    """More threads than this host has logical CPUs only measures the scheduler: refused."""
    import os

    n, cpus = profile.bench.threads, os.cpu_count() or 1
    if n > cpus:
        raise BadInput(f"{option} {n}: this host has {cpus} logical CPUs; use at most {cpus} "
                       f"(0 = one per physical core)")


def _perf_test(path: str | None):
    """The checked ``--onnx-perf-test`` (``bench.onnx_device.LocalPerfTest``), or None without the option."""
    if not path:
        return None
    from edgequant.bench.onnx_device import open_perf_test

    return open_perf_test(path)


def run(request: RunRequest, store, reporter, console, where: Places | None = None) -> RunOutcome:
    """Run ``request`` to its end, storing into ``store``; progress goes to ``reporter`` (the phones' live
    view and the host lock's waiting line to ``console``).  ``where``: the places already resolved
    (``places``).  A run that stops half-way is stored partial and its error raised; one that ends is
    finished complete, or partial with a phone lost, and returned."""
    from edgequant.devices import leases
    from edgequant.devices.select import device_dir as resolve_device_dir
    from edgequant.devices.transport import DeviceError

    profile, suite, cache = request.profile, request.suite, request.cache_root
    where = where or places(request)
    workdir = resolve_device_dir(request.device_dir) if where.phones else None
    perf_test = _perf_test(request.onnx_perf_test)
    lock = nullcontext()       # the host's measuring lock, when this host measures (the eval runs here too)
    if host_measures(request, where):
        check_host_threads(profile)
        lock = leases.measuring_on_host(cache, request.command, request.no_wait,
                                        on_wait=lambda m: console.print(f"[yellow]•[/yellow] {m}"))
    opened: list[farm.Phone] = []
    with lock:
        try:
            # fail fast: a busy (leased), unauthorized or wrong-ABI phone stops nothing half-done
            opened = farm.open_phones(where.phones, workdir, request.runner_dir, cache, reporter,
                                      request.lease_wait, where.pool_entries)
            if perf_test is not None and profile.onnx:
                for phone in opened:   # a build for another OS's linker than a phone's: refused before starting
                    perf_test.require(phone.ctx.os_name, f"device {phone.serial}")
            resolved = prepare.resolve_model(request.model, cache, reporter)
            estimated = estimate.plan_run(resolved, profile, suite, cache, store)
            estimate.check_resources(estimated)       # disk and memory: refused before anything is written
            for line in estimate.format_plan(estimated):
                reporter.step(f"estimate: {line}")
            reporter.expect(estimate.Countdown(estimated))
            run_id = start_or_resume(store, request.resume_id, profile, resolved, request.command, request.force,
                                     request.notice)
            for phone in opened:
                phone.lease.run = run_id        # written into the lease at its next renewal
            failed, executed = _measure(request, RunScope.of(store, run_id, resolved, reporter), resolved, where,
                                        opened, perf_test, console)
        except DeviceError as exc:
            raise EdgequantError(str(exc), 1) from None
        finally:
            farm.close_phones(opened)
    outcome = RunOutcome(run_id, failed + executed.failed, executed.lost)
    if outcome.lost:
        store.finish_run(run_id, "partial", outcome.lost_detail())
    else:
        store.finish_run(run_id, "complete", f"{len(outcome.failed)} rung(s) failed" if outcome.failed else None)
    return outcome


def _measure(request: RunRequest, scope: RunScope, resolved, where: Places, opened: list, perf_test,
             console) -> tuple[list[str], executor.Executed]:
    """The run's body, marked partial if it stops half-way: calibration, the ladder (its build stages and
    failures), the ONNX rungs, then the plan of what the store does not hold yet, executed."""
    store, run_id, reporter = scope.store, scope.run_id, scope.reporter
    profile, cache = request.profile, request.cache_root
    stored = planning.Stored.read(store, run_id)
    with recording_partial(store, run_id, "quantizing",
                           f"`edgequant run --resume {run_id}` finishes it") as stage:
        imatrix, suite, qparams = calibrate.for_profile(profile, request.suite, request.suite_name,
                                                        request.prompting, resolved.model_hash, cache, store,
                                                        reporter.step)
        killed: list = []      # rungs whose quantization was killed (OOM): stored, the others go on
        artifacts = prepare.build_ladder(resolved, profile, cache, reporter, imatrix=imatrix, failed=killed)
        prepare.record_build_stages(store, run_id, artifacts)
        onnx_arts = onnx_rungs.build_onnx(resolved, profile, cache, reporter)
        onnx_rungs.record_onnx_stages(store, run_id, onnx_arts)
        artifacts += onnx_arts
        if not request.resume_id:
            store.set_prep_seconds(run_id, prepare.process_age_seconds())
        build_failed = prepare.record_build_failures(scope, resolved.checkpoint.n_params_estimate, killed)
        run_plan = planning.build(profile, planning.rungs_of(artifacts), where.specs(), suite,
                                  quality_on_device=request.quality_on_device, stored=stored)
        inputs = executor.RunInputs(profile, artifacts, cache, suite, request.prompting, qparams, variant_suite=suite,
                                    quality_on_device=request.quality_on_device, on_host=where.on_host,
                                    perf_test=perf_test)
        executed = executor.execute(run_plan, scope, inputs, phones=opened, runner_dir=request.runner_dir,
                                    console=console, on_stage=lambda now: setattr(stage, "now", now))
    return build_failed, executed

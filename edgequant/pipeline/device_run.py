"""The ladder on a phone: open it, install the runner, and measure every rung there.

For each device (``open_device``): one shell round-trip reads its facts
(ABI, RAM, clusters, thermal, battery); a non-arm64 device is refused; the
runner (``--runner-dir``, else a cached build that runs there, else one is
built) is pushed to ``WORKDIR/bin`` and ``WORKDIR/lib`` with the same
skip-if-same-sha256 and verify-then-rename rules as the models.

For each rung (``bench_on_device``, the same steps for the GGUF rungs,
``bench_rungs_on_device``, and the ONNX rungs, ``bench_onnx_rungs_on_device``),
in ladder order:

1. a rung whose file is larger than the RAM the device has available is
   skipped with that reason (it would only page-thrash or be killed);
2. the GGUF, or the ONNX model files and input sets, are pushed (skipped
   when the device already holds the same bytes);
3. the phone cools down (``devices.health``), and its health is recorded;
4. llama-bench measures a GGUF like the host rows (``bench.device_bench``),
   onnxruntime_perf_test an ONNX rung (``bench.onnx_device``);
5. its health is read again; the rung is *throttled* when the thermal status
   rose or the phone never cooled down;
6. the rows go to the store in one transaction.

A rung that is killed (``oom``), crashes or times out is stored with that
status and the ladder continues.  A transport failure (the phone unplugged,
adbd gone) ends that device's part of the run with :class:`DeviceLost`: the
rungs already finished stay stored and ``edgequant run --resume RUN_ID``
measures the rest.
"""

from __future__ import annotations

import os
import posixpath
import re
import threading
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from edgequant.bench.device_bench import RemoteRunner, device_repack, run_device_bench
from edgequant.devices.measured import device_load, device_top
from edgequant.core.errors import BenchError
from edgequant.devices import select
from edgequant.devices.facts import DeviceFacts, collect_facts, recommended_threads
from edgequant.devices.health import CoolDown, read_health, throttled, wait_cool
from edgequant.devices.push import Pusher
from edgequant.devices.transport import DeviceError, Transport, quote
from edgequant.core.errors import BadInput, EdgequantError
from edgequant.noise import measure_until_quiet, sample_detail
from edgequant.pipeline.scope import RunScope
from edgequant.profiles import BenchSettings, Profile
from edgequant.quantize.ladder import Artifact, ArtifactChanged
from edgequant.results.store import Measurement, RowKey, Store


class DeviceLost(EdgequantError):
    """The connection to a phone failed mid-run; what was finished is stored."""

    def __init__(self, serial: str, doing: str, cause: DeviceError):
        verb = "stopped answering" if cause.kind in ("offline", "timeout") else "failed"
        super().__init__(f"device {serial} {verb} while {doing}: {cause}", 1)
        self.serial = serial
        self.cause = cause


@dataclass
class DeviceContext:
    target: select.Target
    transport: Transport
    facts: DeviceFacts
    workdir: str
    runner_path: Path
    runner_target: str | None
    runner_revision: str | None
    remote: RemoteRunner
    pusher: Pusher
    onnx_tool: Any = None          # bench.onnx_device.RemoteTool once onnxruntime_perf_test is installed

    @property
    def serial(self) -> str:
        return self.target.serial

    @property
    def device_id(self) -> str:
        return f"adb:{self.target.serial}"

    @property
    def os_name(self) -> str:
        return "android" if self.facts.sdk is not None else "linux"

    def device_record(self) -> dict:
        f = self.facts
        clusters = " + ".join(f"{len(c.cpus)}×{c.max_khz / 1e6:.2f} GHz" if c.max_khz else f"{len(c.cpus)}×?"
                              for c in sorted(f.clusters, key=lambda c: c.max_khz or 0))
        return {"kind": self.os_name, "serial": f.serial, "transport": f.transport, "model": f.model,
                "manufacturer": f.manufacturer, "soc": f.soc, "abi": f.abi, "android_release": f.android_release,
                "sdk": f.sdk, "ram_bytes": (f.ram_total_kib or 0) * 1024, "cpu_count": f.cpu_count,
                "cpu_model": " ".join(x for x in (f.manufacturer, f.model) if x) or f.serial,
                "physical_cores": f.cpu_count, "clusters": clusters,
                "runner": self.runner_target, "runner_revision": self.runner_revision}

    def close(self) -> None:
        try:
            self.transport.close()
        except Exception:  # noqa: BLE001 - closing a dead connection must not hide the real error
            pass


def _say(reporter, message: str) -> None:
    reporter.step(message)


# phones opened in parallel (edgequant.farm) build a missing runner once, not once each
_RUNNER_LOCK = threading.Lock()


def choose_runner(facts: DeviceFacts, runner_dir: str | None, cache_root: Path, reporter):
    """The runner for this device: ``--runner-dir``, else a cached one that runs there, else build one."""
    with _RUNNER_LOCK:
        return _choose_runner(facts, runner_dir, cache_root, reporter)


def _choose_runner(facts: DeviceFacts, runner_dir: str | None, cache_root: Path, reporter):
    from edgequant.bench.runner import build_runner, cached_runners, open_runner_dir

    os_name = "android" if facts.sdk is not None else "linux"
    where = f"device {facts.serial}"
    if runner_dir:
        return open_runner_dir(runner_dir, machine="aarch64", os_name=os_name, where=where)
    usable = [r for r in cached_runners(cache_root=cache_root) if r.runs_on("aarch64", os_name)]
    # a build for the device's own OS first (Android's linker, all ARM variants), then a static one
    usable.sort(key=lambda r: (r.os != os_name, r.target or ""))
    if usable:
        return usable[0]
    target = "android-arm64" if os_name == "android" and os.environ.get("ANDROID_NDK_HOME") else "linux-arm64"
    _say(reporter, f"no cached runner for {where}: building the {target} runner (a few minutes, once)")
    return build_runner(target, on_progress=lambda m: _say(reporter, m), cache_root=cache_root)


def open_device(target: select.Target, workdir: str, runner_dir: str | None, cache_root: Path,
                reporter, transport: Transport | None = None) -> DeviceContext:
    """Connect (or use ``transport``, already open), read the facts, refuse non-arm64, install the runner."""
    transport = transport or select.open_transport(target)
    try:
        facts = collect_facts(transport, workdir)
        select.require_arm64(facts)
        runner = choose_runner(facts, runner_dir, cache_root, reporter)
        pusher = Pusher(transport, workdir)
        files = runner.files()
        _say(reporter, f"{target.serial}: installing the runner ({runner.target or runner.path.name}, "
                       f"{len(files)} files) in {workdir}")
        for rel in files:
            pusher.push(runner.path / rel, dest=rel, executable=rel.startswith("bin/"))
        manifest = runner.manifest or {}
        return DeviceContext(target, transport, facts, workdir, runner.path, runner.target,
                             manifest.get("revision"), RemoteRunner.for_runner(runner, workdir), pusher)
    except BaseException:
        transport.close()
        raise


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass(frozen=True)
class RungSteps:
    """A runtime's part of one rung on a device, for :func:`bench_on_device`.

    ``key(art)``: the rows' key.  ``push(art)``: put the rung on the device (through ``ctx.pusher``, whose
    progress is reported) and return a handle; a ``DeviceError`` of kind ``no_space`` skips that rung.
    ``measure(art, handle)``: the performance rows (``None`` entries are left out), or, for a rung measured
    in several variants (depths, cache types: ``edgequant.profiles.variants``), a dict of each variant's name
    to (its key, its rows), all stored in one transaction with the rung's health readings.  ``push`` and ``measure``
    may raise ``BenchError``: the rung is stored with its status and the ladder goes on.  ``variant_keys(art)``
    (optional) names the variants' keys, under which a rung that was not measured is stored."""

    key: Callable[[Artifact], RowKey]
    push: Callable[[Artifact], Any]
    measure: Callable[[Artifact, Any], list[Measurement | None] | dict[str, tuple[RowKey, list]]]
    variant_keys: Callable[[Artifact], list[RowKey]] | None = None
    stage: str = "bench"          # its measuring step's stage_resources rows (``pipeline.phone_stages``)


def bench_on_device(store: Store, run_id: str, artifacts: list[Artifact], ctx: DeviceContext, reporter,
                    steps: RungSteps, cooldown: CoolDown, done: set[str] = frozenset()):
    """Every artifact on one device, one rung at a time (steps 1-6 of the module doc), whatever measures it;
    returns the pipeline's BenchOutcome.  ``done``: quants already stored (a resumed run) are not measured
    again.  A transport failure is :class:`DeviceLost`."""
    from edgequant.pipeline.host import BenchOutcome, RungOutcome, artifact_measurements
    from edgequant.pipeline.phone_stages import PhoneStages

    outcome = BenchOutcome(run_id)
    stages = PhoneStages(store, run_id, ctx.device_id, steps.stage)

    def not_measured(art: Artifact, key: RowKey, status: str, detail: str) -> None:
        keys = steps.variant_keys(art) if steps.variant_keys else []
        if keys:
            store.record_rungs(run_id, [(k, artifact_measurements(art), status, detail) for k in keys])
        else:
            store.record_rung(run_id, key, artifact_measurements(art), status=status, detail=detail)
        outcome.outcomes.append(RungOutcome(art, status, detail))
        reporter.rung_done(art.quant, status)

    doing = "starting the rungs"
    try:
        for art in artifacts:
            if art.quant in done:
                continue
            store.record_artifact(art.record())
            key = steps.key(art)
            reporter.rung_started(art.quant)
            available = (ctx.facts.ram_available_kib or 0) * 1024
            if available and art.size_bytes > available:
                not_measured(art, key, "skipped",
                             f"the file ({_gib(art.size_bytes)}) does not fit in the RAM {ctx.serial} has "
                             f"available ({_gib(available)}); skipped rather than run")
                continue

            doing = f"pushing {art.quant}"

            def progress(p, quant=art.quant):
                reporter.rung_phase(quant, f"push {100 * p.done / max(p.total, 1):.0f}% {p.mb_per_s:.1f} MB/s")

            ctx.pusher.on_progress = progress
            try:
                art.verify()            # the bytes pushed are the ones whose sha256 the rows record
            except ArtifactChanged as exc:
                not_measured(art, key, "failed", str(exc))
                continue
            try:
                handle = stages.push(art, ctx.pusher, lambda: steps.push(art))
            except DeviceError as exc:
                if exc.kind != "no_space":
                    raise
                # a full disk is this rung's problem: smaller rungs may still fit
                not_measured(art, key, "skipped", str(exc))
                continue
            except BenchError as exc:
                not_measured(art, key, exc.status, str(exc))
                continue
            doing = f"waiting for {ctx.serial} to cool down before {art.quant}"
            reporter.rung_phase(art.quant, "cooling down")
            cool = wait_cool(ctx.transport, ctx.workdir, cooldown,
                             on_wait=lambda h, w, q=art.quant: reporter.rung_phase(
                                 q, f"cooling down: {h.describe()} ({w:.0f} s)"))
            doing = f"benchmarking {art.quant}"
            try:
                measured = stages.measure(art, lambda: steps.measure(art, handle))
            except BenchError as exc:
                not_measured(art, key, exc.status, str(exc))
                continue
            doing = f"reading {ctx.serial}'s health after {art.quant}"
            after = read_health(ctx.transport, ctx.workdir)
            hot = throttled(cool, after)
            health = {"before": cool.health.to_dict(), "after": after.to_dict(), "cooled": cool.cooled,
                      "cooldown_wait_s": round(cool.waited_s, 1)}
            rows = artifact_measurements(art) + [
                Measurement("throttled", 1.0 if hot else 0.0, "bool", None, None, health),
                Measurement("cooldown_wait", cool.waited_s, "s"),
            ]
            if cool.health.celsius is not None:
                rows.append(Measurement("device_celsius", cool.health.celsius, "°C", None, None,
                                        {"sensor": cool.health.sensor,
                                         "after": after.celsius}))
            if cool.health.thermal_status is not None:
                rows.append(Measurement("thermal_status", float(cool.health.thermal_status), "level", None, None,
                                        {"after": after.thermal_status}))
            if cool.health.battery_level is not None:
                rows.append(Measurement("battery_level", float(cool.health.battery_level), "%"))
            notes = []
            if hot:
                notes.append("throttled: " + ("thermal status rose during the run" if cool.cooled else
                                              f"did not cool down within {cooldown.max_wait_s:g} s"))

            def verdict(ms) -> tuple[str, str | None]:
                """ok, or noisy when a measurement reported its run as contended (other processes busy on the
                device); the detail joins that with the throttling note."""
                noisy = next((m.detail["noisy"] for m in ms
                              if m is not None and m.metric == "contention" and (m.detail or {}).get("noisy")), None)
                return ("noisy" if noisy else "ok"), "; ".join(([noisy] if noisy else []) + notes) or None

            if isinstance(measured, dict):     # variants: each with the rung's health readings
                entries = [(k, [r for r in rows + list(v) if r is not None], *verdict(v))
                           for k, v in measured.values()]
                stored = store.record_rungs(run_id, entries)
                status, detail = next(((st, d) for st, (_, _, _, d) in zip(stored, entries) if st != "ok"),
                                      ("ok", "; ".join(notes) or None))
            else:
                status, detail = verdict(measured)
                stored = store.record_rung(run_id, key, [r for r in rows + list(measured) if r is not None],
                                           status=status, detail=detail)
                if stored not in (None, status):   # a figure was not finite: the store made the rung failed
                    status, detail = stored, "a figure is not a finite number"
            if status not in ("ok", "noisy"):
                outcome.outcomes.append(RungOutcome(art, status, detail))
                reporter.rung_done(art.quant, status)
                continue
            outcome.outcomes.append(RungOutcome(art, status, detail))
            reporter.rung_done(art.quant, status if not hot else f"{status} (throttled)")
    except DeviceError as exc:
        raise DeviceLost(ctx.serial, doing, exc) from None
    return outcome


def device_params(settings: BenchSettings, threads: int, repack: bool | None) -> dict[str, Any]:
    """The parameters stored with a GGUF rung measured on a device (``threads`` resolved for it)."""
    return {"runner": "device", "threads": threads, "n_prompt": settings.n_prompt, "n_gen": settings.n_gen,
            "repetitions": settings.repetitions, "warmup": settings.warmup, "n_batch": settings.n_batch,
            "n_ubatch": settings.n_ubatch, "flash_attn": settings.flash_attn, "mmap": settings.mmap,
            "repack": repack if repack is not None else "default"}


def bench_rungs_on_device(scope: RunScope, artifacts: list[Artifact], profile: Profile, ctx: DeviceContext,
                          cooldown: CoolDown | None = None, done: set[str] = frozenset(), suite=None):
    """Measure every GGUF artifact on one device with llama-bench (``bench_on_device``, see the module doc);
    returns the pipeline's BenchOutcome.

    ``done``: quants already stored for this device (a resumed run) are not measured again.
    A profile's depths and cache types (``pipeline.bench_variants``; ``suite`` resolves a ``"suite"`` depth)
    are measured by the on-device llama-bench itself: one invocation per cache type with every depth in
    its ``-d`` (one model load each), each variant stored as a rung of its own (``Q4_K_M@d512``); with
    ``device.energy`` sampling the battery, one invocation per variant, so that the run's last tg test,
    over which the energy is read, is the variant's own.
    """
    from edgequant.pipeline.host import bench_variants

    store, run_id, reporter = scope.store, scope.run_id, scope.reporter
    settings = profile.bench
    variants = bench_variants(profile, artifacts, suite)
    threads = settings.threads if settings.threads > 0 else recommended_threads(ctx.facts)
    repack = device_repack(settings)
    params = device_params(settings, threads, repack)
    device = ctx.device_record()
    runtime_version = metadata.version("llama-cpp-python")
    rundir = posixpath.join(ctx.workdir, "runs", run_id)
    try:
        ctx.transport.shell(f"mkdir -p {quote(rundir)}", 60)
    except DeviceError as exc:
        raise DeviceLost(ctx.serial, "preparing the run folder", exc) from None

    def key(art: Artifact) -> RowKey:
        return scope.key(art, device_id=ctx.device_id, device=device, runtime="llama.cpp",
                         runtime_version=runtime_version, params=params)

    def push(art: Artifact):
        return ctx.pusher.push(art.path, art.sha256, name=f"{art.quant}.gguf")

    def variant_keys(art: Artifact) -> list[RowKey]:
        return [replace(key(art), quant=v.name(art.quant), params=v.params(params, settings),
                        is_reference=art.is_reference and i == 0) for i, v in enumerate(variants)]

    def measure_variants(art: Artifact, pushed) -> dict[str, tuple[RowKey, list[Measurement | None]]]:
        """One llama-bench per cache type, with every depth in it (its own -d); rows per variant.  With
        energy sampled (``device.energy``, the phone on battery), one llama-bench per variant instead: the
        power samples are read over the run's last tg test, which must then be the variant's own."""
        keys = dict(zip(variants, variant_keys(art)))
        energy = profile.device.energy
        charging = _charging(ctx) if energy else None
        power_dir = profile.device.power_supply if energy and not charging else None
        out: dict[str, tuple[RowKey, list[Measurement | None]]] = {}
        for i, group in enumerate(_variant_invocations(variants, per_variant=power_dir is not None)):
            cache_type = group[0].cache_type
            res = run_device_bench(ctx.transport, ctx.remote, pushed.remote, settings, workdir=rundir,
                                   threads=threads, repack=repack, with_load_time=i == 0,
                                   depths=tuple(v.depth for v in group), cache_type=cache_type,
                                   on_progress=lambda ph, q=art.quant, t=cache_type:
                                   reporter.rung_phase(q, f"{ph} {t}"), power_dir=power_dir)
            for v in group:
                pp, tg, ttft = res.by_depth[v.depth]
                rows = _device_rows(replace(res, pp=pp, tg=tg, ttft_ms=ttft,
                                            load_s=res.load_s if v is variants[0] else None))
                out[keys[v].quant] = (keys[v], rows + (_energy_rows(res, charging, profile.device.power_supply)
                                                       if energy else []))
        return out

    def measure(art: Artifact, pushed) -> list[Measurement | None]:
        if variants:
            return measure_variants(art, pushed)
        energy = profile.device.energy
        charging = _charging(ctx) if energy else None

        def once(remote: str, settings_: BenchSettings):
            return run_device_bench(ctx.transport, ctx.remote, remote, settings_, workdir=rundir,
                                    threads=threads, repack=repack,
                                    on_progress=lambda ph, q=art.quant: reporter.rung_phase(q, ph),
                                    power_dir=profile.device.power_supply if energy and not charging else None)

        # the other load on the phone during the run: re-measured after waiting for quiet, else noisy
        quiet = measure_until_quiet(once, pushed.remote, settings,
                                    on_phase=lambda ph, q=art.quant: reporter.rung_phase(q, ph),
                                    read_load=lambda seconds: device_load(ctx.transport, seconds),
                                    read_top=lambda: device_top(ctx.transport))
        res = quiet.result
        contention = quiet.measurement()
        if contention is not None and quiet.noisy:
            contention = replace(contention, detail={**contention.detail, "noisy": quiet.detail()})
        return (_device_rows(res) + [contention]
                + (_energy_rows(res, charging, profile.device.power_supply) if energy else []))

    return bench_on_device(store, run_id, artifacts, ctx, reporter,
                           RungSteps(key, push, measure, variant_keys if variants else None),
                           cooldown or profile.device.cooldown(), done)


def sustained_on_device(scope: RunScope, artifacts: list[Artifact], profile: Profile, ctx: DeviceContext) -> str:
    """``[sustained]`` on one device: ``runs`` llama-bench generation runs (``-p 0 -n N -r 1
    --no-warmup``, one process each) of the sustained rung, each started as soon as the previous one
    and the readings after it are done: no cool-down.  After each run: Android's thermal status, the
    battery's and the hottest sensor's temperatures (``dumpsys thermalservice``/``battery``), and the
    current clock of the fastest cluster (``cpufreq/scaling_cur_freq``) where readable.  Stored by
    ``pipeline.sustained_rung``; returns its status.  A transport failure is :class:`DeviceLost`."""
    from edgequant.bench.sustained import SustainedRun
    from edgequant.devices.facts import HEALTH_SECTIONS, collect_facts
    from edgequant.pipeline.host import sustained_rung

    run_id = scope.run_id
    settings = profile.bench
    threads = settings.threads if settings.threads > 0 else recommended_threads(ctx.facts)
    repack = device_repack(settings)
    rundir = posixpath.join(ctx.workdir, "runs", run_id)
    fast = max(ctx.facts.clusters, key=lambda c: c.max_khz or 0, default=None)
    clock_file = (f"/sys/devices/system/cpu/cpu{fast.cpus[0]}/cpufreq/scaling_cur_freq"
                  if fast and fast.cpus else None)

    def reading() -> dict:
        f = collect_facts(ctx.transport, ctx.workdir, timeout=60, sections=HEALTH_SECTIONS)
        hottest = max(f.temperatures, key=lambda t: t.celsius, default=None)
        khz = None
        if clock_file:
            out = ctx.transport.shell(f"cat {quote(clock_file)} 2>/dev/null", 30).stdout.strip()
            khz = int(out) if out.isdigit() and 0 < int(out) < 1 << 31 else None
        return {"celsius": hottest.celsius if hottest else None, "sensor": hottest.name if hottest else None,
                "thermal_status": f.thermal_status, "battery_celsius": f.battery_celsius, "cpu_khz": khz}

    def measure(art: Artifact, runs: int, n_gen: int, on_progress):
        one = replace(settings, n_prompt=0, n_gen=n_gen, repetitions=1, warmup=0)
        pushed = ctx.pusher.push(art.path, art.sha256, name=f"{art.quant}.gguf")   # already there: not sent
        ctx.transport.shell(f"mkdir -p {quote(rundir)}", 60)
        before = reading()
        energy = profile.device.energy
        charging = _charging(ctx) if energy else None     # read once: the series runs without a pause
        out = []
        for i in range(runs):
            on_progress(f"sustained {i + 1}/{runs}")
            # each run is one tg test: the power samples of its whole tail are its own
            res = run_device_bench(ctx.transport, ctx.remote, pushed.remote, one, workdir=rundir, threads=threads,
                                   repack=repack, with_load_time=False,
                                   power_dir=profile.device.power_supply if energy and not charging else None)
            spent = energy_figures(_energy_rows(res, charging, profile.device.power_supply)) if energy else None
            out.append(SustainedRun(run=i + 1, tg_tps=res.tg.mean, **reading(), energy=spent))
        return out, before

    try:
        return sustained_rung(scope, artifacts, profile, device=ctx.device_record(), device_id=ctx.device_id,
                              measure=measure, runner="device")
    except DeviceError as exc:
        raise DeviceLost(ctx.serial, "running the sustained mode", exc) from None


def _charging(ctx: DeviceContext) -> str | None:
    """Why the battery cannot measure the run's energy (it is being charged: USB, AC, wireless), or None."""
    from edgequant.devices.facts import HEALTH_SECTIONS, collect_facts

    f = collect_facts(ctx.transport, ctx.workdir, timeout=60, sections=HEALTH_SECTIONS)
    if f.battery_powered:
        return (f"the phone is charging ({', '.join(f.battery_powered)} powered): the battery current does not "
                f"show what the run draws; measure over `adb tcpip` with the cable out")
    return None


def _energy_rows(res, charging: str | None, power_dir: str) -> list[Measurement]:
    """Average power and joules per generated token over the run's last tg test (the tail of the power
    samples as long as its timed repetitions); ``energy_per_token`` = 0 with the reason when not measured."""
    from edgequant.devices.measured import window_energy

    def not_measured(reason: str) -> list[Measurement]:
        return [Measurement("energy_per_token", 0.0, "J/token", None, None, {"not_measured": reason})]

    if charging:
        return not_measured(charging)
    if not res.power:
        return not_measured(f"{power_dir}/current_now and voltage_now could not be read on the phone; set "
                            f"device.power_supply to its battery's power-supply folder")
    if not res.tg_seconds or not res.tg_tokens:
        return not_measured("the run generated no tokens (bench.n_gen = 0)")
    window = window_energy(res.power, res.tg_seconds)
    if window is None:
        return not_measured("the generation test was shorter than two power samples (0.2 s apart)")
    watts, joules, n = window
    detail = {"samples": n, "seconds": res.tg_seconds, "tokens": res.tg_tokens, "source": power_dir}
    return [Measurement("avg_power", watts, "W", None, n, detail),
            Measurement("energy_per_token", joules / res.tg_tokens, "J/token", None, n, detail)]


def _variant_invocations(variants: list, per_variant: bool) -> list[list]:
    """How the on-device llama-bench runs a rung's variants: one invocation per cache type with every depth
    in its ``-d`` (one model load each), or, ``per_variant`` (energy sampled), one invocation per variant."""
    if per_variant:
        return [[v] for v in variants]
    groups: dict[str, list] = {}
    for v in variants:
        groups.setdefault(v.cache_type, []).append(v)
    return list(groups.values())


def energy_figures(rows: list[Measurement]) -> dict:
    """``_energy_rows``' figures as one dict (a sustained run's ``energy``): ``j_per_token``, ``watts`` and
    the samples' detail, or ``not_measured`` with the reason."""
    by = {m.metric: m for m in rows}
    e = by["energy_per_token"]
    reason = (e.detail or {}).get("not_measured")
    if reason:
        return {"not_measured": reason}
    return {"j_per_token": e.value, "watts": by["avg_power"].value, **(e.detail or {})}


def _device_rows(res) -> list[Measurement | None]:
    """The rows of one llama-bench measurement on a device (``bench.device_bench.DeviceBenchResult``)."""
    return [
        Measurement("pp_tps", res.pp.mean, "t/s", res.pp.stddev, res.pp.n,
                    {"build_commit": res.build_commit, "cpu_info": res.cpu_info, **sample_detail(res.pp)})
        if res.pp else None,
        Measurement("tg_tps", res.tg.mean, "t/s", res.tg.stddev, res.tg.n, sample_detail(res.tg))
        if res.tg else None,
        Measurement("ttft", res.ttft_ms.mean, "ms", res.ttft_ms.stddev, res.ttft_ms.n)
        if res.ttft_ms else None,
        Measurement("load_time", res.load_s, "s", None, 1) if res.load_s is not None else None,
        Measurement("peak_rss", res.peak_rss_bytes, "bytes", None, None, {"source": "time -v Max RSS"}),
        Measurement("peak_rss_anon", res.peak_rss_anon_bytes, "bytes", None, res.rss_samples,
                    {"source": "largest RssAnon of /proc/<pid>/status samples"}),
        Measurement("peak_rss_file", res.peak_rss_file_bytes, "bytes", None, res.rss_samples,
                    {"source": "largest RssFile of /proc/<pid>/status samples"}),
        ]


def bench_onnx_rungs_on_device(scope: RunScope, artifacts: list[Artifact], profile: Profile, ctx: DeviceContext,
                               staging_root: Path, tool=None, skip_reason: str = "",
                               cooldown: CoolDown | None = None, done: set[str] = frozenset()):
    """The ONNX rungs on one device with onnxruntime_perf_test (``bench.onnx_device``), through the same
    per-rung steps as the GGUF rungs (``bench_on_device``: RAM fit, push, cool down, health, throttled);
    rows with the host rows' metric names (pp_tps = prefill, tg_tps = decode, ttft = prefill latency).

    ``tool``: the host's ``bench.onnx_device.LocalPerfTest``, installed in the work directory once per
    connection (a file the device holds with the same sha256 is not sent again); without it every rung is
    stored as skipped with ``skip_reason``.  The input sets are written under ``staging_root/<serial>``.
    ``done``: quants already stored for this device (a resumed run) are not measured again."""
    from edgequant.pipeline import onnx_rungs as onnx_pipeline
    from edgequant.bench.onnx_device import install_perf_test, run_staged_onnx, stage_onnx_on_device

    store, run_id, reporter = scope.store, scope.run_id, scope.reporter
    settings = profile.bench
    threads = settings.threads if settings.threads > 0 else recommended_threads(ctx.facts)
    artifacts = [a for a in artifacts if a.quant not in done]
    if tool is None:
        return onnx_pipeline.skip_onnx_rungs_on_device(scope, artifacts, profile, ctx.device_id,
                                                       ctx.device_record(), skip_reason, threads)
    if artifacts and ctx.onnx_tool is None:
        tool.require(ctx.os_name, f"device {ctx.serial}")
        ctx.pusher.on_progress = None
        _say(reporter, f"{ctx.serial}: installing {tool.describe()} in {ctx.workdir}")
        try:
            ctx.onnx_tool = install_perf_test(ctx.pusher, tool)
        except DeviceError as exc:
            raise DeviceLost(ctx.serial, f"installing {tool.path.name}", exc) from None
    device = ctx.device_record()
    staging = staging_root / re.sub(r"[^A-Za-z0-9._-]", "_", ctx.serial)   # one folder per phone thread

    def key(art: Artifact) -> RowKey:
        return onnx_pipeline.device_key(scope, art, profile, ctx.device_id, device, threads)

    def push(art: Artifact):
        return stage_onnx_on_device(ctx.transport, ctx.pusher, art.path, art.sha256, settings, staging=staging,
                                    on_progress=lambda ph, q=art.quant: reporter.rung_phase(q, ph))

    def measure(art: Artifact, staged) -> list[Measurement]:
        res = run_staged_onnx(ctx.transport, ctx.onnx_tool, staged, settings, threads=threads,
                              on_progress=lambda ph, q=art.quant: reporter.rung_phase(q, ph))
        return onnx_pipeline.device_measurements(res)

    return bench_on_device(store, run_id, artifacts, ctx, reporter,
                           RungSteps(key, push, measure, stage="bench-onnx"), cooldown or profile.device.cooldown())


def resolve_devices(specs: tuple[str, ...]) -> tuple[bool, list[select.Target]]:
    """(include the host, the phones) for ``--device`` specs."""
    targets = select.resolve(list(specs))
    phones = [t for t in targets if isinstance(t, select.Target)]
    if not phones and "host" not in targets:
        raise BadInput("--device named no device")
    return "host" in targets, phones

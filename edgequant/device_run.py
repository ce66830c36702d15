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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from edgequant.bench.device_bench import RemoteRunner, device_repack, run_device_bench
from edgequant.bench.host import BenchError
from edgequant.devices import select
from edgequant.devices.facts import DeviceFacts, collect_facts, recommended_threads
from edgequant.devices.health import CoolDown, read_health, throttled, wait_cool
from edgequant.devices.push import Pusher
from edgequant.devices.transport import DeviceError, Transport, quote
from edgequant.errors import BadInput, EdgequantError
from edgequant.profiles import Profile
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
    ``measure(art, handle)``: the performance rows (``None`` entries are left out).  ``push`` and ``measure``
    may raise ``BenchError``: the rung is stored with its status and the ladder goes on."""

    key: Callable[[Artifact], RowKey]
    push: Callable[[Artifact], Any]
    measure: Callable[[Artifact, Any], list[Measurement | None]]


def bench_on_device(store: Store, run_id: str, artifacts: list[Artifact], ctx: DeviceContext, reporter,
                    steps: RungSteps, cooldown: CoolDown, done: set[str] = frozenset()):
    """Every artifact on one device, one rung at a time (steps 1-6 of the module doc), whatever measures it;
    returns the pipeline's BenchOutcome.  ``done``: quants already stored (a resumed run) are not measured
    again.  A transport failure is :class:`DeviceLost`."""
    from edgequant.pipeline import BenchOutcome, RungOutcome, _artifact_measurements

    outcome = BenchOutcome(run_id)

    def not_measured(art: Artifact, key: RowKey, status: str, detail: str) -> None:
        store.record_rung(run_id, key, _artifact_measurements(art), status=status, detail=detail)
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
                handle = steps.push(art)
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
                measured = steps.measure(art, handle)
            except BenchError as exc:
                not_measured(art, key, exc.status, str(exc))
                continue
            doing = f"reading {ctx.serial}'s health after {art.quant}"
            after = read_health(ctx.transport, ctx.workdir)
            hot = throttled(cool, after)
            health = {"before": cool.health.to_dict(), "after": after.to_dict(), "cooled": cool.cooled,
                      "cooldown_wait_s": round(cool.waited_s, 1)}
            rows = _artifact_measurements(art) + list(measured) + [
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
            stored = store.record_rung(run_id, key, [r for r in rows if r is not None], status="ok",
                                       detail="throttled: " + ("thermal status rose during the run" if cool.cooled
                                                               else f"did not cool down within "
                                                                    f"{cooldown.max_wait_s:g} s")
                                       if hot else None)
            if stored not in (None, "ok"):    # a figure was not finite: the store made the rung failed
                outcome.outcomes.append(RungOutcome(art, stored, "a figure is not a finite number"))
                reporter.rung_done(art.quant, stored)
                continue
            outcome.outcomes.append(RungOutcome(art, "ok"))
            reporter.rung_done(art.quant, "ok" if not hot else "ok (throttled)")
    except DeviceError as exc:
        raise DeviceLost(ctx.serial, doing, exc) from None
    return outcome


def bench_rungs_on_device(store: Store, run_id: str, model_id: str, model_hash: str, artifacts: list[Artifact],
                          profile: Profile, ctx: DeviceContext, reporter, cooldown: CoolDown | None = None,
                          done: set[str] = frozenset()):
    """Measure every GGUF artifact on one device with llama-bench (``bench_on_device``, see the module doc);
    returns the pipeline's BenchOutcome.

    ``done``: quants already stored for this device (a resumed run) are not measured again.
    """
    settings = profile.bench
    threads = settings.threads if settings.threads > 0 else recommended_threads(ctx.facts)
    repack = device_repack(settings)
    params = {"runner": "device", "threads": threads, "n_prompt": settings.n_prompt, "n_gen": settings.n_gen,
              "repetitions": settings.repetitions, "warmup": settings.warmup, "n_batch": settings.n_batch,
              "n_ubatch": settings.n_ubatch, "flash_attn": settings.flash_attn, "mmap": settings.mmap,
              "repack": repack if repack is not None else "default"}
    device = ctx.device_record()
    runtime_version = metadata.version("llama-cpp-python")
    rundir = posixpath.join(ctx.workdir, "runs", run_id)
    try:
        ctx.transport.shell(f"mkdir -p {quote(rundir)}", 60)
    except DeviceError as exc:
        raise DeviceLost(ctx.serial, "preparing the run folder", exc) from None

    def key(art: Artifact) -> RowKey:
        return RowKey(model_id=model_id, model_hash=model_hash, quant=art.quant, artifact_sha256=art.sha256,
                      is_reference=art.is_reference, device_id=ctx.device_id, device=device,
                      runtime="llama.cpp", runtime_version=runtime_version, params=params)

    def push(art: Artifact):
        return ctx.pusher.push(art.path, art.sha256, name=f"{art.quant}.gguf")

    def measure(art: Artifact, pushed) -> list[Measurement | None]:
        res = run_device_bench(ctx.transport, ctx.remote, pushed.remote, settings, workdir=rundir,
                               threads=threads, repack=repack,
                               on_progress=lambda ph, q=art.quant: reporter.rung_phase(q, ph))
        return [
            Measurement("pp_tps", res.pp.mean, "t/s", res.pp.stddev, res.pp.n,
                        {"build_commit": res.build_commit, "cpu_info": res.cpu_info}) if res.pp else None,
            Measurement("tg_tps", res.tg.mean, "t/s", res.tg.stddev, res.tg.n) if res.tg else None,
            Measurement("ttft", res.ttft_ms.mean, "ms", res.ttft_ms.stddev, res.ttft_ms.n)
            if res.ttft_ms else None,
            Measurement("load_time", res.load_s, "s", None, 1) if res.load_s is not None else None,
            Measurement("peak_rss", res.peak_rss_bytes, "bytes", None, None, {"source": "time -v Max RSS"}),
            Measurement("peak_rss_anon", res.peak_rss_anon_bytes, "bytes", None, res.rss_samples,
                        {"source": "largest RssAnon of /proc/<pid>/status samples"}),
            Measurement("peak_rss_file", res.peak_rss_file_bytes, "bytes", None, res.rss_samples,
                        {"source": "largest RssFile of /proc/<pid>/status samples"}),
        ]

    return bench_on_device(store, run_id, artifacts, ctx, reporter, RungSteps(key, push, measure),
                           cooldown or profile.device.cooldown(), done)


def bench_onnx_rungs_on_device(store: Store, run_id: str, model_id: str, model_hash: str,
                               artifacts: list[Artifact], profile: Profile, ctx: DeviceContext, reporter,
                               staging_root: Path, tool=None, skip_reason: str = "",
                               cooldown: CoolDown | None = None, done: set[str] = frozenset()):
    """The ONNX rungs on one device with onnxruntime_perf_test (``bench.onnx_device``), through the same
    per-rung steps as the GGUF rungs (``bench_on_device``: RAM fit, push, cool down, health, throttled);
    rows with the host rows' metric names (pp_tps = prefill, tg_tps = decode, ttft = prefill latency).

    ``tool``: the host's ``bench.onnx_device.LocalPerfTest``, installed in the work directory once per
    connection (a file the device holds with the same sha256 is not sent again); without it every rung is
    stored as skipped with ``skip_reason``.  The input sets are written under ``staging_root/<serial>``.
    ``done``: quants already stored for this device (a resumed run) are not measured again."""
    from edgequant import onnx_pipeline
    from edgequant.bench.onnx_device import install_perf_test, run_staged_onnx, stage_onnx_on_device

    settings = profile.bench
    threads = settings.threads if settings.threads > 0 else recommended_threads(ctx.facts)
    artifacts = [a for a in artifacts if a.quant not in done]
    if tool is None:
        return onnx_pipeline.skip_onnx_rungs_on_device(store, run_id, model_id, model_hash, artifacts, profile,
                                                       ctx.device_id, ctx.device_record(), skip_reason, reporter,
                                                       threads)
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
        return onnx_pipeline.device_key(model_id, model_hash, art, profile, ctx.device_id, device, threads)

    def push(art: Artifact):
        return stage_onnx_on_device(ctx.transport, ctx.pusher, art.path, art.sha256, settings, staging=staging,
                                    on_progress=lambda ph, q=art.quant: reporter.rung_phase(q, ph))

    def measure(art: Artifact, staged) -> list[Measurement]:
        res = run_staged_onnx(ctx.transport, ctx.onnx_tool, staged, settings, threads=threads,
                              on_progress=lambda ph, q=art.quant: reporter.rung_phase(q, ph))
        return onnx_pipeline.device_measurements(res)

    return bench_on_device(store, run_id, artifacts, ctx, reporter, RungSteps(key, push, measure),
                           cooldown or profile.device.cooldown())


def resolve_devices(specs: tuple[str, ...]) -> tuple[bool, list[select.Target]]:
    """(include the host, the phones) for ``--device`` specs."""
    targets = select.resolve(list(specs))
    phones = [t for t in targets if isinstance(t, select.Target)]
    if not phones and "host" not in targets:
        raise BadInput("--device named no device")
    return "host" in targets, phones

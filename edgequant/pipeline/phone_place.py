"""A phone as a place to measure single GGUF files on outside a run (``edgequant noise``, ``compare
--recheck``; ``edgequant.noise.Places`` opens it), through the run's own device path."""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any, Callable

from edgequant.bench.device_bench import device_repack, run_device_bench
from edgequant.devices.facts import recommended_threads
from edgequant.devices.health import CoolDown, wait_cool
from edgequant.devices.measured import device_load, device_top
from edgequant.devices.transport import DeviceError, quote
from edgequant.pipeline.device_run import DeviceContext, DeviceLost, device_params
from edgequant.profiles import BenchSettings


class DevicePlace:
    """One opened phone (its lease held) as a place to measure single GGUF files on, outside a run
    (``edgequant noise``, ``compare --recheck``), through a run's own device path: the file is pushed
    when the phone does not hold it (content-addressed, verified), the phone cools down
    (``profile.device``), the on-device llama-bench runs under the measuring shell, whose reading of the
    phone's own /proc/stat gives the other load; waiting for quiet polls the phone, and its busiest
    processes are read there.  A transport failure is :class:`DeviceLost`."""

    runner = "device"

    def __init__(self, ctx: DeviceContext, lease=None, cooldown: CoolDown | None = None, folder: str = "measure"):
        self.ctx = ctx
        self.lease = lease                   # farm.DeviceLease: renewed before every measurement
        self.cooldown = cooldown
        self.rundir = posixpath.join(ctx.workdir, "runs", folder)
        self._made = False

    @property
    def device_id(self) -> str:
        return self.ctx.device_id

    def threads(self, settings: BenchSettings) -> int:
        return settings.threads if settings.threads > 0 else recommended_threads(self.ctx.facts)

    def repack(self, settings: BenchSettings) -> bool | None:
        return device_repack(settings)

    def params(self, settings: BenchSettings) -> dict[str, Any]:
        return device_params(settings, self.threads(settings), self.repack(settings))

    def prepare(self, path: Path, sha256: str, quant: str,
                on_progress: Callable[[str], None] | None = None) -> str:
        """Push the GGUF (skipped when the phone holds the same bytes); its path on the phone."""
        def progress(p):
            if on_progress is not None:
                on_progress(f"push {100 * p.done / max(p.total, 1):.0f}% {p.mb_per_s:.1f} MB/s")

        self.ctx.pusher.on_progress = progress
        try:
            return self.ctx.pusher.push(Path(path), sha256, name=f"{quant}.gguf").remote
        except DeviceError as exc:
            if exc.kind == "no_space":
                raise
            raise DeviceLost(self.ctx.serial, f"pushing {quant}", exc) from None

    def measure(self, remote: str, settings: BenchSettings, repack: bool | None = None,
                on_progress: Callable[[str], None] | None = None):
        """One llama-bench of ``remote`` (a path from :meth:`prepare`) with ``settings``; no load-time probe."""
        doing = f"measuring {posixpath.basename(remote)}"
        try:
            if self.lease is not None:
                self.lease.renew()
            if not self._made:
                self.ctx.transport.shell(f"mkdir -p {quote(self.rundir)}", 60)
                self._made = True
            if self.cooldown is not None:
                wait_cool(self.ctx.transport, self.ctx.workdir, self.cooldown)
            return run_device_bench(self.ctx.transport, self.ctx.remote, remote, settings, workdir=self.rundir,
                                    threads=self.threads(settings), repack=repack, with_load_time=False,
                                    on_progress=on_progress)
        except DeviceError as exc:
            raise DeviceLost(self.ctx.serial, doing, exc) from None

    def read_load(self, seconds: float):
        try:
            return device_load(self.ctx.transport, seconds)
        except DeviceError as exc:
            raise DeviceLost(self.ctx.serial, "waiting for quiet", exc) from None

    def read_top(self) -> list[dict]:
        return device_top(self.ctx.transport)

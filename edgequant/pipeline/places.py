"""The places a run's cells, ``edgequant noise`` and ``compare --recheck`` measure on: this host and a phone
(an opened ``pipeline.device_run.DeviceContext``).  Each registers by kind (``registry.Place``) and is opened
through the registry (``registry.place_class``) by the executor and by ``edgequant.noise.Places`` alike."""

from __future__ import annotations

import posixpath
import tempfile
from pathlib import Path
from typing import Any, Callable

from edgequant.bench.device_bench import device_repack, run_device_bench, run_measured
from edgequant.bench.host import measure_gguf
from edgequant.devices.contention import host_top, machine_load
from edgequant.devices.facts import recommended_threads
from edgequant.devices.health import wait_cool
from edgequant.devices.host import host_device, host_device_id
from edgequant.devices.local import LocalTransport
from edgequant.devices.measured import device_load, device_top
from edgequant.devices.transport import DeviceError, quote
from edgequant.pipeline.device_run import DeviceLost, device_params
from edgequant.pipeline.registry import Place
from edgequant.profiles import BenchSettings


class HostPlace(Place, kind="host"):
    """This machine: files are used where they are; a measured command runs under the same time command
    and /proc poller as on a phone, through this host's shell; a GGUF is measured by the worker a host run
    uses (``bench.host``), and the other load is this host's /proc/stat and processes."""

    name = "host"

    def __init__(self, workdir: str | None = None):
        self.device_id = host_device_id()
        self.workdir = workdir

    def device(self) -> dict:
        return host_device()

    def facts(self) -> dict:
        return self.device()

    def push(self, local, sha256: str, name: str) -> str:
        return str(Path(local).resolve())

    def run_measured(self, argv: list[str], *, timeout: float, time_cmd: tuple[str, ...] = ("toybox", "time", "-v")):
        if self.workdir is not None:
            return run_measured(LocalTransport(), argv, self.workdir, time_cmd=time_cmd, deadline_s=timeout)
        with tempfile.TemporaryDirectory(prefix="eq-measured-") as workdir:   # its files are read before it goes
            return run_measured(LocalTransport(), argv, workdir, time_cmd=time_cmd, deadline_s=timeout)

    # -- measuring one GGUF outside a run (edgequant noise, compare --recheck) --

    def repack(self, settings: BenchSettings) -> bool:
        return settings.resolved_repack()

    def params(self, settings: BenchSettings) -> dict[str, Any]:
        return {"runner": "host", **settings.as_params()}

    def prepare(self, path: Path, sha256: str, quant: str, on_progress=None) -> Path:
        return Path(path)

    def measure(self, path: Path, settings: BenchSettings, repack: bool | None = None,
                on_progress: Callable[[str], None] | None = None):
        return measure_gguf(path, settings, on_progress=on_progress, repack=repack)

    def read_load(self, seconds: float):
        return machine_load(seconds)

    def read_top(self) -> list[dict]:
        return host_top()


class PhonePlace(Place, kind="device"):
    """A phone opened for the run or a command (its lease held, the runner installed).

    Measuring one GGUF outside a run goes through a run's own device path: the file is pushed when the
    phone does not hold it (content-addressed, verified), the phone cools down (``cooldown``, from
    ``profile.device``), the on-device llama-bench runs under the measuring shell, whose reading of the
    phone's own /proc/stat gives the other load; waiting for quiet polls the phone, and its busiest
    processes are read there.  ``lease`` (``farm.DeviceLease``) is renewed before every measurement.  A
    transport failure is ``device_run.DeviceLost``."""

    def __init__(self, ctx, lease=None, cooldown=None, folder: str = "measure"):
        self.ctx = ctx
        self.name = ctx.serial
        self.device_id = ctx.device_id
        self.lease = lease
        self.cooldown = cooldown
        self.rundir = posixpath.join(ctx.workdir, "runs", folder)
        self._made = False

    def device(self) -> dict:
        return self.ctx.device_record()

    def facts(self):
        return self.ctx.facts

    def push(self, local, sha256: str, name: str) -> str:
        return self.ctx.pusher.push(Path(local), sha256, name=name).remote

    def run_measured(self, argv: list[str], *, timeout: float):
        return run_measured(self.ctx.transport, argv, self.ctx.workdir, deadline_s=timeout)

    # -- measuring one GGUF outside a run (edgequant noise, compare --recheck) --

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

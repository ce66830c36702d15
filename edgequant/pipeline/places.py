"""The places cells run on: this host and a phone (an opened ``pipeline.device_run.DeviceContext``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from edgequant.pipeline.registry import Place


class HostPlace(Place, kind="host"):
    """This machine: files are used where they are; a measured command runs under the same time command
    and /proc poller as on a phone, through this host's shell."""

    name = "host"

    def __init__(self, workdir: str | None = None):
        from edgequant.devices.host import host_device_id

        self.device_id = host_device_id()
        self.workdir = workdir

    def device(self) -> dict:
        from edgequant.devices.host import host_device

        return host_device()

    def facts(self) -> dict:
        return self.device()

    def push(self, local, sha256: str, name: str) -> str:
        return str(Path(local).resolve())

    def run_measured(self, argv: list[str], *, timeout: float, time_cmd: tuple[str, ...] = ("toybox", "time", "-v")):
        from edgequant.bench.device_bench import run_measured
        from edgequant.devices.local import LocalTransport

        if self.workdir is not None:
            return run_measured(LocalTransport(), argv, self.workdir, time_cmd=time_cmd, deadline_s=timeout)
        with tempfile.TemporaryDirectory(prefix="eq-measured-") as workdir:   # its files are read before it goes
            return run_measured(LocalTransport(), argv, workdir, time_cmd=time_cmd, deadline_s=timeout)


class PhonePlace(Place, kind="device"):
    """A phone opened for the run (its lease held, the runner installed)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.name = ctx.serial
        self.device_id = ctx.device_id

    def device(self) -> dict:
        return self.ctx.device_record()

    def facts(self):
        return self.ctx.facts

    def push(self, local, sha256: str, name: str) -> str:
        return self.ctx.pusher.push(Path(local), sha256, name=name).remote

    def run_measured(self, argv: list[str], *, timeout: float):
        from edgequant.bench.device_bench import run_measured

        return run_measured(self.ctx.transport, argv, self.ctx.workdir, deadline_s=timeout)

"""``edgequant devices``: survey every reachable device and render what it is."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from edgequant.core.errors import EdgequantError, one_line
from edgequant.core.paths import cache_dir
from edgequant.devices import select
from edgequant.devices.facts import DeviceFacts, collect_facts, recommended_threads
from edgequant.devices.host import host_device
from edgequant.devices.transport import DeviceError


def unusable_reason(facts: DeviceFacts) -> str | None:
    """Why edgequant cannot measure on this device (None: it can)."""
    if facts.transport == "host":
        return None
    if not facts.is_arm64:
        return f"ABI {facts.abi or 'unknown'}: edgequant's device tools are arm64-v8a only"
    if facts.workdir_writable is False:
        return f"work directory {facts.workdir} cannot be created or written: pick another with --device-dir"
    return None


@dataclass
class Entry:
    serial: str
    transport: str
    facts: DeviceFacts | None = None
    error: DeviceError | None = None

    @property
    def unusable(self) -> str | None:
        """The reason edgequant cannot measure on this device, or None."""
        if self.facts is None:
            return one_line(self.error, 160)
        return unusable_reason(self.facts)

    def to_dict(self) -> dict:
        usable = {"usable": self.unusable is None, "unusable_reason": self.unusable}
        if self.facts is not None:
            return {**self.facts.to_dict(), **usable}
        return {"serial": self.serial, "transport": self.transport, "error": self.error.kind,
                "message": str(self.error), **usable}


def _host_facts() -> DeviceFacts:
    import psutil

    h = host_device()
    folder = cache_dir()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return DeviceFacts(serial=h["hostname"], transport="host", model=h["cpu_model"], soc=h["cpu_model"],
                       abi=h["arch"], ram_total_kib=h["ram_bytes"] // 1024,
                       ram_available_kib=psutil.virtual_memory().available // 1024, cpu_count=h["logical_cores"],
                       workdir=str(cache_dir()), workdir_free_kib=shutil.disk_usage(folder).free // 1024)


def survey(specs: tuple[str, ...] | list[str], workdir: str) -> list[Entry]:
    """One entry per device: its facts, or the one-line error that stopped us reading them.

    Without specs: every device the adb server (or USB) knows, whatever its state,
    and the endpoints of ``EDGEQUANT_DEVICES``."""
    entries: list[Entry] = []
    if specs:
        targets = select.resolve(list(specs))
    else:
        targets = []
        for k in select.known_devices():
            if k.state == "device":
                targets.append(select.Target(k.serial, k.transport, usb=k.transport == "direct"))
            else:
                try:
                    select.check_state(k)
                except DeviceError as exc:
                    entries.append(Entry(k.serial, k.transport, error=exc))
        targets += [t for t in (select.parse_spec(s) for s in select.env_endpoints())
                    if isinstance(t, select.Target) and t not in targets]
        if not targets and not entries:
            raise DeviceError("offline", "no device found: connect a phone with USB debugging on, or name one "
                                         "with --device HOST:PORT (adb tcpip phones, device farms) or "
                                         "--device server:SERIAL")
    for target in targets:
        if target == "host":
            entries.append(Entry("host", "host", facts=_host_facts()))
            continue
        transport = None
        try:
            transport = select.open_transport(target)
            entries.append(Entry(target.serial, target.transport, facts=collect_facts(transport, workdir)))
        except DeviceError as exc:
            entries.append(Entry(target.serial, target.transport, error=exc))
        finally:
            if transport is not None:
                transport.close()
    return sorted(entries, key=lambda e: (e.facts is None, e.serial))


def failure(entries: list[Entry]) -> EdgequantError | None:
    """One line for the devices that could not be read (None when all were)."""
    failed = [e for e in entries if e.error is not None]
    if not failed:
        return None
    more = f" (and {len(failed) - 1} more device(s) failed)" if len(failed) > 1 else ""
    return EdgequantError(str(failed[0].error) + more, 1)


def _gib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 2**20:.1f}"


def _clusters(f: DeviceFacts) -> str:
    if not f.clusters:
        return f"{f.cpu_count}× ?" if f.cpu_count else "?"
    parts = [f"{len(c.cpus)}×{c.max_khz / 1e6:.2f}" if c.max_khz else f"{len(c.cpus)}×?"
             for c in sorted(f.clusters, key=lambda c: (c.max_khz or 0))]
    return " + ".join(parts) + " GHz"


def render_table(entries: list[Entry], console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="devices")
    for col, justify in (("serial", "left"), ("via", "left"), ("usable", "left"), ("model", "left"),
                         ("SoC", "left"), ("ABI", "left"), ("Android", "left"), ("RAM GiB\ntotal/avail", "right"),
                         ("CPU clusters", "left"), ("threads", "right"), ("free GiB\nworkdir", "right"),
                         ("thermal", "left"), ("battery", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for e in entries:
        f = e.facts
        if f is None:
            table.add_row(e.serial, e.transport, f"[red]no: {escape(e.error.kind)}[/red]", escape(one_line(e.error)),
                          *[""] * 9)
            continue
        usable = "yes" if e.unusable is None else f"[red]no: {escape(e.unusable)}[/red]"
        android = (f"{f.android_release} (SDK {f.sdk})" if f.android_release else "—") if f.transport != "host" \
            else "host"
        hottest = max(f.temperatures, key=lambda t: t.celsius, default=None)
        thermal = " ".join(x for x in (f.thermal_status_name, f"{hottest.celsius:.0f}°C {hottest.name}"
                                       if hottest else None) if x) or "?"
        battery = (f"{f.battery_level}%" if f.battery_level is not None else "") + \
                  (f" {f.battery_celsius:.1f}°C" if f.battery_celsius is not None else "")
        table.add_row(f.serial, f.transport, usable, f.model or "?", f.soc or "?", f.abi or "?", android,
                      f"{_gib(f.ram_total_kib)}/{_gib(f.ram_available_kib)}", _clusters(f),
                      str(recommended_threads(f)), _gib(f.workdir_free_kib), thermal, battery.strip() or "—")
    console.print(table)

"""Which device(s) a ``--device`` spec names, and the transport to reach each.

Specs:

==================  ==========================================================
``host``            the workstation itself (no transport)
``SERIAL``          a device the adb server knows (``server``), else a USB
                    phone adb-shell can open (``direct``, needs the usb extra)
``HOST:PORT``       a phone's adbd over TCP, directly (``adb tcpip`` phones,
``tcp:HOST:PORT``   DeviceFarmer/STF endpoints); no adb server involved
``server:SERIAL``   through the adb server; ``server:HOST:PORT`` first runs
                    ``adb connect HOST:PORT`` on the server
``all``             every device the adb server knows in state ``device``,
                    plus the ``host:port`` endpoints of ``EDGEQUANT_DEVICES``
==================  ==========================================================

No spec: the one reachable device; none or several are a one-line error.
Transports register by name, with the spec prefix that names them, in :data:`TRANSPORTS`
(``@register_transport``); a new one is one module plus one registration.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from typing import Callable

from edgequant.core.errors import BadInput
from edgequant.devices.keys import UNAUTHORIZED_HINT
from edgequant.devices.transport import DeviceError, Transport

DEFAULT_DEVICE_DIR = "/data/local/tmp/edgequant"


def device_dir(option: str | None = None, env: dict[str, str] | None = None) -> str:
    """The device work directory: ``--device-dir``, else ``EDGEQUANT_DEVICE_DIR``, else the default."""
    env = os.environ if env is None else env
    value = option or env.get("EDGEQUANT_DEVICE_DIR") or DEFAULT_DEVICE_DIR
    if not value.startswith("/") or "\0" in value or "\n" in value:
        raise BadInput(f"device work directory {value!r} must be an absolute POSIX path "
                       "(e.g. /data/local/tmp/edgequant)")
    return posixpath.normpath(value)


@dataclass(frozen=True)
class Target:
    """One device to reach: its serial and the transport that reaches it."""

    serial: str
    transport: str          # a key of TRANSPORTS
    connect: bool = False   # server: `adb connect` the serial first
    usb: bool = False       # direct: over USB rather than TCP


_HOSTPORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})")
_SERIAL = re.compile(r"[A-Za-z0-9._:\-\[\]]{1,128}")


@dataclass(frozen=True)
class TransportEntry:
    """A registered transport: ``open`` reaches a :class:`Target`; ``prefix`` is the spec prefix that names it
    (``PREFIX:ADDRESS``) and ``parse(address, spec)`` the target such a spec names."""

    name: str
    open: Callable[[Target], Transport]
    prefix: str | None = None
    parse: Callable[[str, str], Target] | None = None


TRANSPORTS: dict[str, TransportEntry] = {}


def register_transport(name: str, *, prefix: str | None = None, parse: Callable[[str, str], Target] | None = None):
    """Decorator registering an opener as transport ``name``, named in specs by ``prefix:`` (see ``parse_spec``).
    A decorator rather than a subclass hook: a transport is reached by one function, its class lives in its
    own module (imported only when used, so a missing optional dependency fails only there)."""
    if (prefix is None) != (parse is None):
        raise ValueError("a transport's spec prefix and its parser go together")

    def register(open_fn: Callable[[Target], Transport]) -> Callable[[Target], Transport]:
        TRANSPORTS[name] = TransportEntry(name, open_fn, prefix, parse)
        return open_fn

    return register


def _tcp_target(addr: str, spec: str) -> Target:
    if not _HOSTPORT.fullmatch(addr):
        raise BadInput(f"--device {spec!r}: expected tcp:HOST:PORT (e.g. tcp:192.168.1.20:5555)")
    return Target(addr, "direct")


@register_transport("direct", prefix="tcp", parse=_tcp_target)
def _open_direct(target: Target) -> Transport:
    # each transport module loads its adb library (adb_shell, adbutils) when it is imported: only when used
    from edgequant.devices.direct import DirectTransport

    return DirectTransport(target.serial, usb=target.usb)


def _server_target(serial: str, spec: str) -> Target:
    if not _SERIAL.fullmatch(serial):
        raise BadInput(f"--device {spec!r}: expected server:SERIAL or server:HOST:PORT")
    return Target(serial, "server", connect=bool(_HOSTPORT.fullmatch(serial)))


@register_transport("server", prefix="server", parse=_server_target)
def _open_server(target: Target) -> Transport:
    from edgequant.devices import server

    if target.connect:
        server.connect(target.serial)
    states = dict(server.list_devices())
    if target.serial not in states:
        raise DeviceError("offline", f"the adb server has no device {target.serial}"
                          + (f" (it has: {', '.join(states)})" if states else "")
                          + "; `edgequant devices` lists the reachable ones")
    check_state(Known(target.serial, states[target.serial], "server"))
    return server.ServerTransport(target.serial)


def _prefixed(spec: str) -> tuple[TransportEntry, str] | None:
    """(the transport whose ``prefix:`` starts ``spec``, the address after it), or None."""
    head, sep, rest = spec.partition(":")
    entry = next((e for e in TRANSPORTS.values() if e.prefix == head), None) if sep else None
    return (entry, rest) if entry is not None else None


def parse_spec(spec: str) -> Target | str:
    """A :class:`Target`, or one of the words ``host`` / ``all`` / a bare serial to look up
    (returned as the string ``"serial:<SERIAL>"``)."""
    spec = spec.strip()
    if spec in ("host", "all"):
        return spec
    _check_port(spec)
    prefixed = _prefixed(spec)
    if prefixed is not None:
        entry, addr = prefixed
        return entry.parse(addr, spec)
    if _HOSTPORT.fullmatch(spec):
        return Target(spec, "direct")
    if not _SERIAL.fullmatch(spec):
        raise BadInput(f"--device {spec!r} is not a device spec: use host, SERIAL, HOST:PORT, tcp:HOST:PORT, "
                       "server:SERIAL or all")
    return "serial:" + spec


def _check_port(spec: str) -> None:
    """A HOST:PORT whose port cannot exist is bad input, said at once (not a connection retried)."""
    prefixed = _prefixed(spec)
    addr = prefixed[1] if prefixed is not None else spec
    if _HOSTPORT.fullmatch(addr):
        port = int(addr.rsplit(":", 1)[1])
        if not 1 <= port <= 65535:
            raise BadInput(f"--device {spec!r}: port {port} is out of range (1-65535); use HOST:PORT with the "
                           f"port adbd listens on (e.g. 5555)")


def env_endpoints(env: dict[str, str] | None = None) -> list[str]:
    """``EDGEQUANT_DEVICES``: comma-separated specs that ``all`` and the listing include."""
    env = os.environ if env is None else env
    return [s.strip() for s in (env.get("EDGEQUANT_DEVICES") or "").split(",") if s.strip()]


@dataclass(frozen=True)
class Known:
    serial: str
    state: str              # adb's states: device, unauthorized, offline, ...
    transport: str


def known_devices() -> list[Known]:
    """Devices the running adb server knows (any state), then USB phones adb-shell can open."""
    from edgequant.devices import server
    from edgequant.devices.direct import usb_serials

    found = [Known(s, st, "server") for s, st in server.list_devices()]
    seen = {k.serial for k in found}
    found += [Known(s, "device", "direct") for s in usb_serials() if s not in seen]
    return found


def _describe(known: list[Known]) -> str:
    return ", ".join(f"{k.serial} ({k.state})" if k.state != "device" else k.serial for k in known)


def check_state(k: Known) -> None:
    if k.state == "unauthorized":
        raise DeviceError("unauthorized", f"device {k.serial} is unauthorized: {UNAUTHORIZED_HINT}")
    if k.state != "device":
        raise DeviceError("offline", f"device {k.serial} is {k.state}: reconnect it (or restart adb) and retry")


def resolve(specs: list[str] | tuple[str, ...]) -> list[Target | str]:
    """The targets the specs name (``"host"`` stays a word); errors are one line each."""
    specs = list(specs)
    if not specs:
        known = known_devices()
        endpoints = [parse_spec(s) for s in env_endpoints()]
        usable = [k for k in known if k.state == "device"]
        if len(usable) + len(endpoints) == 0:
            if known:
                check_state(known[0])
            raise DeviceError("offline", "no device found: connect a phone with USB debugging on, or name one "
                                         "with --device HOST:PORT (adb tcpip phones, device farms) or "
                                         "--device server:SERIAL")
        if len(usable) + len(endpoints) > 1:
            names = [k.serial for k in usable] + [e.serial for e in endpoints if isinstance(e, Target)]
            raise BadInput(f"several devices and none chosen: {', '.join(names)}; pick one with --device SERIAL "
                           "(or --device all)")
        return endpoints or [Target(usable[0].serial, usable[0].transport, usb=usable[0].transport == "direct")]
    targets: list[Target | str] = []
    known: list[Known] | None = None
    for spec in specs:
        parsed = parse_spec(spec)
        if parsed == "host":
            targets.append("host")
        elif parsed == "all":
            known = known_devices() if known is None else known
            targets += [Target(k.serial, k.transport, usb=k.transport == "direct")
                        for k in known if k.state == "device"]
            targets += [t for t in (parse_spec(s) for s in env_endpoints()) if isinstance(t, Target)]
        elif isinstance(parsed, Target):
            targets.append(parsed)
        else:
            serial = parsed.split(":", 1)[1]
            known = known_devices() if known is None else known
            match = [k for k in known if k.serial == serial]
            if not match:
                listed = f"known: {_describe(known)}" if known else "no adb server runs and no USB phone is visible"
                raise BadInput(f"unknown device serial {serial!r} ({listed}); "
                               "`edgequant devices` lists the reachable ones")
            check_state(match[0])
            targets.append(Target(serial, match[0].transport, usb=match[0].transport == "direct"))
    unique: list[Target | str] = []
    for t in targets:
        if t not in unique:
            unique.append(t)
    if not unique:
        raise DeviceError("offline", "--device all found no device: connect a phone with USB debugging on, or "
                                     "list HOST:PORT endpoints in EDGEQUANT_DEVICES")
    return unique


def open_transport(target: Target) -> Transport:
    return TRANSPORTS[target.transport].open(target)


def require_arm64(facts) -> None:
    """One line when the device cannot run the arm64 llama.cpp tools edgequant pushes."""
    if not facts.is_arm64:
        raise DeviceError("abi", f"device {facts.serial} has ABI {facts.abi or 'unknown'}; edgequant's device "
                                 "tools are built for arm64-v8a (aarch64): pick an arm64 device")

"""AdbPeer: an adbd on 127.0.0.1 serving a sandbox folder, with injectable faults."""

from __future__ import annotations

import os
import pwd
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import keys, qemu, services, wire
from .android import DEFAULT_PROPS, TYPE_BATTERY, TYPE_CPU, TYPE_SKIN, AndroidFixtures, Temperature
from .connection import Connection, Stream

# What this peer implements (sent in the CNXN banner).  Not advertised, so
# clients fall back: sendrecv_v2*, stat_v2, ls_v2 (sync v1 only), cmd/abb
# (no package manager), apex, remount_shell, track_app.  ``delayed_ack`` is
# implemented but only the "modern" personality advertises it.
DEFAULT_FEATURES = ("shell_v2", "fixed_push_mkdir", "fixed_push_symlink_timestamp")


@dataclass(frozen=True)
class Personality:
    """How one family of real adbd builds behaves on the wire.

    max_payload    the largest payload announced in CNXN (4 KiB before Android 7,
                   256 KiB in 7 and 8, 1 MiB since 9)
    version        the protocol version announced in CNXN; below
                   ``A_VERSION_SKIP_CHECKSUM`` every packet carries a checksum,
                   and a packet whose checksum is wrong drops the connection
    features       the CNXN banner's features: without ``shell_v2`` the
                   ``shell,v2:``/``shell,raw:`` services are unknown (CLSE), with
                   ``delayed_ack`` a host that asks for it gets AOSP's windowed
                   flow control (docs/dev/delayed_ack.md in AOSP's adb)
    legacy_close   every stream ends with CLSE(0, host-id), the packet a modern
                   adbd only uses to refuse an OPEN (adbd before the socket
                   shutdown hook, and many embedded and vendor daemons)
    exec_service   whether ``exec:`` exists (older daemons answer it with CLSE)
    """

    name: str
    max_payload: int = wire.MAX_PAYLOAD
    version: int = wire.A_VERSION
    features: tuple[str, ...] = DEFAULT_FEATURES
    legacy_close: bool = False
    exec_service: bool = True


# "classic": what this peer always was (adbd of Android 9 to 12); "modern": delayed acks offered too;
# "legacy": an old or embedded adbd (4 KiB payloads, checksums, no shell v2, no exec:, CLSE(0, id)).
PERSONALITIES = {
    "classic": Personality("classic"),
    "modern": Personality("modern", features=DEFAULT_FEATURES + ("delayed_ack",)),
    "legacy": Personality("legacy", max_payload=wire.MAX_PAYLOAD_V1, version=wire.A_VERSION_MIN, features=(),
                          legacy_close=True, exec_service=False),
}


@dataclass
class LmkRule:
    """Kill (SIGKILL) peer processes whose command line matches ``pattern``.

    ``pattern`` is a regular expression searched in the command line (argv
    joined by spaces).  A process is killed ``delay`` seconds after the peer
    first sees it.  When a matching process has a matching descendant (a shell
    or ``toybox time`` running the real program), only the descendant is
    killed, as lmkd picks one victim.
    """

    pattern: str
    delay: float = 0.0


@dataclass
class Faults:
    """Faults a test switches on and off at any time, even while a command runs.

    drop_send_after   bytes of file data after which a sync SEND cuts the TCP
                      connection (what was written stays on disk); None: off
    drop_send_times   how many SENDs get cut (counts down); None: every one
    stall             service-name prefix -> seconds before its OPEN is answered
    refuse            service-name prefixes answered with CLSE at once
    reject_keys       AUTH never succeeds (signatures fail, the prompt is never answered)
    disk_free         bytes free on the device: a SEND writing more fails with
                      "write failed: No space left on device"; df reports it; None: off
    lmk               low-memory-killer rules (see LmkRule)
    max_payload       this device's max payload; applies to new connections
    sndbuf / rcvbuf   SO_SNDBUF / SO_RCVBUF of new connections (None: default)
    """

    drop_send_after: int | None = None
    drop_send_times: int | None = None
    stall: dict[str, float] = field(default_factory=dict)
    refuse: set[str] = field(default_factory=set)
    reject_keys: bool = False
    disk_free: int | None = None
    lmk: list[LmkRule] = field(default_factory=list)
    max_payload: int = wire.MAX_PAYLOAD
    sndbuf: int | None = None
    rcvbuf: int | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        hook = self.__dict__.get("_on_change")
        if hook is not None:
            hook(name)


class AdbPeer:
    """The daemon side of ADB on a free 127.0.0.1 port, in background threads.

    ``personality`` ("classic", "modern", "legacy" or a :class:`Personality`)
    picks the daemon it behaves like; ``max_payload`` and ``features`` override
    the personality's.  Use as a context manager (or ``start()``/``close()``).  Attributes:
    ``host``, ``port``, ``serial`` ("127.0.0.1:PORT"), ``sandbox`` (a real
    folder: shell cwd and the only place sync may touch), ``faults``,
    ``services`` (every service name the host opened, in order), ``events``
    ((kind, detail) tuples: cnxn, auth, online, stall, refused,
    unknown_service, sync, drop, no_space, lmk, ...), ``errors`` (internal
    errors of the peer itself; a test may assert it is empty),
    ``authorized_keys`` (adb_keys lines), ``android`` (the fixture tools'
    state: props, dumpsys texts, disk), ``host_writes`` (WRTE payload size from
    the host -> count) and ``max_unacked`` (the most bytes a stream held that
    the host had sent and the peer had not yet acknowledged).
    """

    def __init__(self, sandbox: Path, *, props: dict[str, str] | None = None,
                 authorized_keys: list[str] | None = None, auto_accept: bool = False, auth: bool = True,
                 max_payload: int | None = None, sndbuf: int | None = None, rcvbuf: int | None = None,
                 features: tuple[str, ...] | None = None, personality: str | Personality = "classic",
                 use_qemu: bool = True, qemu_cpu: str | None = None, host: str = "127.0.0.1", port: int = 0):
        self.sandbox = Path(sandbox)
        self.sandbox.mkdir(parents=True, exist_ok=True)
        self._sandbox_real = os.path.realpath(self.sandbox)
        self.authorized_keys: list[str] = list(authorized_keys or [])
        self.auto_accept = auto_accept
        self.auth_required = auth
        self.personality = PERSONALITIES[personality] if isinstance(personality, str) else personality
        self.features = tuple(self.personality.features if features is None else features)
        self.host = host
        self._requested_port = port
        self.port = 0
        self.services: list[str] = []
        self.events: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.lmk_kills: list[tuple[int, str]] = []
        self.host_writes: dict[int, int] = {}   # WRTE payload size from the host -> how many
        self.max_unacked = 0                     # most host bytes one stream held unacknowledged
        self.read_delay = 0.0                    # seconds each stream waits before consuming a WRTE
        self._lock = threading.Lock()
        self._connections: set[Connection] = set()
        self._sessions: set[int] = set()
        self._processes: dict[int, subprocess.Popen] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._root = Path(tempfile.mkdtemp(prefix="adbpeer-"))
        self.android = AndroidFixtures(self._root, {**DEFAULT_PROPS, **(props or {})})
        self.faults = Faults(max_payload=self.personality.max_payload if max_payload is None else max_payload,
                             sndbuf=sndbuf, rcvbuf=rcvbuf)
        object.__setattr__(self.faults, "_on_change", self._fault_changed)
        self._qemu_env: dict[str, str] = {}
        if use_qemu:
            qemu_path = qemu.find_qemu()
            if qemu_path is not None:
                self._qemu_env = qemu.shim_environment(qemu_path, qemu_cpu)
        self._base_env = self._make_environment()

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> AdbPeer:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self._requested_port))
        listener.listen(16)
        listener.settimeout(0.2)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._spawn(self._accept_loop, "adbpeer-accept")
        self._spawn(self._lmk_loop, "adbpeer-lmk")
        return self

    def __enter__(self) -> AdbPeer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        self.drop_connections()
        self._kill_all_processes()
        for thread in self._threads:
            thread.join(timeout=2)
        self.android.remove()

    @property
    def serial(self) -> str:
        return f"{self.host}:{self.port}"

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, address = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.faults.sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.faults.sndbuf)
            if self.faults.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.faults.rcvbuf)
            conn = Connection(self, sock, address)
            with self._lock:
                self._connections.add(conn)
            self.event("connect", f"{address[0]}:{address[1]}")
            threading.Thread(target=conn.serve, name=f"adbpeer-conn-{address[1]}", daemon=True).start()

    def drop_connections(self) -> None:
        """Cut every host connection now (a cable pulled, Wi-Fi lost)."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.abort()

    def connection_closed(self, conn: Connection) -> None:
        with self._lock:
            self._connections.discard(conn)
        self.event("disconnect", f"{conn.address[0]}:{conn.address[1]}")

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    # -- bookkeeping -------------------------------------------------------------
    def event(self, kind: str, detail: str = "") -> None:
        with self._lock:
            self.events.append((kind, detail))

    def events_of(self, kind: str) -> list[str]:
        with self._lock:
            return [detail for k, detail in self.events if k == kind]

    def note_host_write(self, size: int, unacked: int) -> None:
        with self._lock:
            self.host_writes[size] = self.host_writes.get(size, 0) + 1
            self.max_unacked = max(self.max_unacked, unacked)

    def record_error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    def service_opened(self, service: str) -> None:
        with self._lock:
            self.services.append(service)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"adbpeer: timed out waiting for {what}")
            time.sleep(0.01)

    # -- auth ------------------------------------------------------------------
    def banner(self) -> str:
        props = self.android.props
        fields = [f"{key}={props.get(key, '')}" for key in ("ro.product.name", "ro.product.model", "ro.product.device")]
        fields.append("features=" + ",".join(self.features))
        return "device::" + ";".join(fields)

    def find_signing_key(self, token: bytes, signature: bytes) -> str | None:
        with self._lock:
            lines = list(self.authorized_keys)
        for line in lines:
            try:
                key = keys.decode_android_pubkey(line)
            except keys.KeyFormatError:
                continue
            if keys.verify_token_signature(key, token, signature):
                return line
        return None

    def allow_pending(self) -> int:
        """Tap "Allow" on every pending RSA prompt; returns how many connections came online."""
        with self._lock:
            connections = list(self._connections)
        return sum(1 for conn in connections if conn.allow_pending())

    def authorize(self, key_line: str) -> None:
        """Add a key to adb_keys (what tapping "Always allow" does)."""
        with self._lock:
            if key_line not in self.authorized_keys:
                self.authorized_keys.append(key_line)

    # -- services and the shell ------------------------------------------------
    def resolve_service(self, service: str) -> Callable[[Stream], None] | None:
        return services.resolve(self, service)

    def inside_sandbox(self, path: str) -> bool:
        if not path.startswith("/"):
            return False
        real = os.path.realpath(path)
        return real == self._sandbox_real or real.startswith(self._sandbox_real + os.sep)

    def _make_environment(self) -> dict[str, str]:
        try:
            user = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            user = "shell"
        env = {
            "PATH": f"{self.android.bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.sandbox),
            "TMPDIR": str(self.sandbox),
            "HOSTNAME": self.android.props.get("ro.product.device", "android"),
            "USER": user,
            "LOGNAME": user,
            "SHELL": "/bin/sh",
            "ANDROID_ROOT": "/system",
            "ANDROID_DATA": "/data",
        }
        env.update(self._qemu_env)
        return env

    def shell_environment(self, term: str | None) -> dict[str, str]:
        env = dict(self._base_env)
        if term:
            env["TERM"] = term
        return env

    @property
    def qemu_enabled(self) -> bool:
        return bool(self._qemu_env)

    def process_started(self, proc: subprocess.Popen, command: str) -> None:
        with self._lock:
            self._sessions.add(proc.pid)
            self._processes[proc.pid] = proc
        self.event("process", f"{proc.pid} {command}")

    def process_finished(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._processes.pop(proc.pid, None)

    def _session_processes(self) -> dict[int, tuple[int, str, str]]:
        """pid -> (ppid, start time, command line) of live processes in the peer's sessions."""
        with self._lock:
            sessions = set(self._sessions)
        found: dict[int, tuple[int, str, str]] = {}
        if not sessions:
            return found
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    stat_line = fh.read().decode("utf-8", "replace")
                fields = stat_line[stat_line.rindex(")") + 2:].split()
                # fields[0] is state (field 3); ppid is field 4, session field 6, starttime field 22.
                if fields[0] == "Z" or int(fields[3]) not in sessions:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmdline = fh.read().rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
                found[int(entry)] = (int(fields[1]), fields[19], cmdline)
            except (OSError, ValueError, IndexError):
                continue
        return found

    def _kill_all_processes(self) -> None:
        for pid in self._session_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        with self._lock:
            procs = list(self._processes.values())
        for proc in procs:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass

    # -- low-memory killer -------------------------------------------------------
    def _lmk_loop(self) -> None:
        first_seen: dict[tuple[int, str], float] = {}
        while not self._stop.wait(0.02):
            rules = list(self.faults.lmk)
            if not rules:
                first_seen.clear()
                continue
            procs = self._session_processes()
            now = time.monotonic()
            for rule in rules:
                regex = re.compile(rule.pattern)
                matches = {pid for pid, (_, _, cmd) in procs.items() if regex.search(cmd)}
                victims = {pid for pid in matches if not self._has_descendant_in(pid, matches, procs)}
                for pid in victims:
                    key = (pid, procs[pid][1])
                    seen = first_seen.setdefault(key, now)
                    if now - seen >= rule.delay:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            continue
                        with self._lock:
                            self.lmk_kills.append((pid, procs[pid][2]))
                        self.event("lmk", f"{pid} {procs[pid][2]}")

    @staticmethod
    def _has_descendant_in(pid: int, matches: set[int], procs: dict[int, tuple[int, str, str]]) -> bool:
        for other in matches:
            seen = set()
            parent = procs.get(other, (0,))[0]
            while parent and parent not in seen:
                if parent == pid:
                    return True
                seen.add(parent)
                parent = procs.get(parent, (0,))[0]
        return False

    # -- faults and Android state -------------------------------------------------
    def _fault_changed(self, name: str) -> None:
        if name == "disk_free":
            self.android.set_disk(self.faults.disk_free)

    def take_send_drop(self) -> int | None:
        """The byte count after which this SEND is cut, consuming one of ``drop_send_times``."""
        with self._lock:
            after = self.faults.drop_send_after
            if after is None:
                return None
            times = self.faults.drop_send_times
            if times is not None:
                if times <= 0:
                    return None
                self.faults.drop_send_times = times - 1
            return after

    @property
    def props(self) -> dict[str, str]:
        return self.android.props

    def set_prop(self, key: str, value: str) -> None:
        self.android.set_prop(key, value)

    def set_battery(self, **fields) -> None:
        self.battery_fields = dict(fields)
        self.android.set_battery(**fields)

    battery_fields: dict[str, Any] = {}
    power_supply_dir: Path | None = None

    def set_charging(self, on: bool) -> None:
        """Plug the USB power in or out (``dumpsys battery``'s "USB powered"; the peer starts plugged in,
        as a phone on a cable is)."""
        self.set_battery(**{**self.battery_fields, "usb_powered": bool(on)})

    def power_supply(self, current_ua: int = -300_000, voltage_uv: int = 3_950_000) -> Path:
        """A battery power-supply folder (``current_now`` in uA, ``voltage_now`` in uV, as the kernel's)
        in the sandbox, for ``device.power_supply``; ``simulate_heat`` raises its current under load."""
        folder = self.sandbox / "power_supply" / "battery"
        folder.mkdir(parents=True, exist_ok=True)
        self.power_supply_dir = folder
        self._write_power(current_ua, voltage_uv)
        return folder

    def _write_power(self, current_ua: int, voltage_uv: int) -> None:
        folder = self.power_supply_dir
        if folder is None:
            return
        for name, value in (("current_now", current_ua), ("voltage_now", voltage_uv)):
            tmp = folder / f".{name}.tmp"
            tmp.write_text(f"{value}\n")
            os.replace(tmp, folder / name)

    def set_thermal(self, status: int, temperatures: list[Temperature] | None = None) -> None:
        self.android.set_thermal(status, temperatures)

    def set_dumpsys(self, service: str, text: str | None) -> None:
        self.android.set_dumpsys(service, text)

    # -- heat: a phone that warms up under load and cools down at rest ------------
    def simulate_heat(self, pattern: str = r"llama-bench", *, rise_c_per_s: float = 4.0,
                      fall_c_per_s: float = 2.0, ambient_c: float = 30.0, c_per_status: float = 3.0,
                      interval: float = 0.1, busy_ua: int = 1_500_000, idle_ua: int = 300_000) -> None:
        """From now on, while a process whose command line matches ``pattern`` runs in the peer's
        sessions, the big cores' sensor rises ``rise_c_per_s``; otherwise it falls ``fall_c_per_s``
        toward ``ambient_c``.  ``dumpsys thermalservice`` reports it (status = one level per
        ``c_per_status`` degrees above ambient, at most 6), and ``dumpsys battery`` a battery that
        follows at a quarter of the rise.  With a ``power_supply()`` folder its current is ``busy_ua``
        under load and ``idle_ua`` at rest (discharging: negative).  ``heat_celsius`` is the current value."""
        self.heat_celsius = ambient_c
        regex = re.compile(pattern)

        def loop() -> None:
            last = time.monotonic()
            while not self._stop.wait(interval):
                now = time.monotonic()
                busy = any(regex.search(cmd) for _, _, cmd in self._session_processes().values())
                dt, last = now - last, now
                if busy:
                    self.heat_celsius += rise_c_per_s * dt
                else:
                    self.heat_celsius = max(ambient_c, self.heat_celsius - fall_c_per_s * dt)
                rise = self.heat_celsius - ambient_c
                status = min(6, int(rise // c_per_status))
                battery = 25.0 + rise / 4
                self.android.set_thermal(status, [
                    Temperature("cpu4-big-usr", self.heat_celsius, TYPE_CPU, 0),
                    Temperature("cpu0-silver-usr", ambient_c + rise / 2, TYPE_CPU, 0),
                    Temperature("battery", battery, TYPE_BATTERY, 0),
                    Temperature("skin", ambient_c + rise / 3, TYPE_SKIN, status)])
                self.android.set_battery(**{**self.battery_fields, "temperature_c": battery})
                self._write_power(-busy_ua if busy else -idle_ua, 3_950_000)

        self._spawn(loop, "adbpeer-heat")

"""The ``server`` transport: the host adb server, through adbutils.

A device farm normally has one adb server owning every USB phone (and the
``host:port`` phones it was told to ``adb connect`` to); this transport asks
that server.  The server is found at ``ANDROID_ADB_SERVER_HOST`` /
``ANDROID_ADB_SERVER_PORT`` (default 127.0.0.1:5037), as adb itself does;
adbutils starts one (its wheel ships the AOSP ``adb`` client) when a command
needs a server and none runs.  Listing devices never starts one.

* Exit codes: ``shell2(v2=True)`` where the device advertises ``shell_v2``
  (stdout and stderr apart, the real status), the marker of
  :mod:`edgequant.devices.exitcode` otherwise.
* Push: the sync protocol's SEND written here over an adbutils connection, in
  64 KiB DATA chunks with progress (adbutils' own push sends 4 KiB pieces and
  reports nothing).
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import time
from pathlib import Path

from edgequant.core.atomic import atomic_path
from edgequant.core.errors import BadInput
from edgequant.devices import exitcode
from edgequant.devices.keys import UNAUTHORIZED_HINT
from edgequant.devices.transport import DeviceError, ProgressFn, ShellResult

SYNC_DATA_MAX = 64 * 1024      # the largest DATA chunk adbd accepts
SEND_BATCH = 1 << 20           # DATA chunks are written to the server 1 MiB at a time


def server_address(env: dict[str, str] | None = None) -> tuple[str, int]:
    env = os.environ if env is None else env
    host = env.get("ANDROID_ADB_SERVER_HOST") or "127.0.0.1"
    port = env.get("ANDROID_ADB_SERVER_PORT") or "5037"
    if not port.isdigit():
        raise BadInput(f"ANDROID_ADB_SERVER_PORT={port!r} is not a port number")
    return host, int(port)


def server_running(address: tuple[str, int] | None = None, timeout: float = 0.5) -> bool:
    """Whether an adb server answers (checked without starting one)."""
    try:
        with socket.create_connection(address or server_address(), timeout=timeout):
            return True
    except OSError:
        return False


def client(address: tuple[str, int] | None = None):
    from adbutils import AdbClient

    host, port = address or server_address()
    return AdbClient(host=host, port=port, socket_timeout=30)


def list_devices(address: tuple[str, int] | None = None) -> list[tuple[str, str]]:
    """(serial, state) of every device the running adb server knows; [] when no server runs."""
    if not server_running(address):
        return []
    from adbutils.errors import AdbError

    try:
        return [(d.serial, d.state) for d in client(address).list()]
    except AdbError as exc:
        raise DeviceError("offline", f"the adb server at {_where(address)} did not answer ({exc}); "
                                     "restart it with `adb kill-server`") from None


def _where(address) -> str:
    host, port = address or server_address()
    return f"{host}:{port}"


def disconnect(addr: str, address: tuple[str, int] | None = None) -> None:
    from adbutils.errors import AdbError

    try:
        client(address).disconnect(addr)
    except AdbError:
        pass


def _settled_state(addr: str, address, timeout: float) -> str | None:
    """The server's state for ``addr`` once it stops changing (connecting, authorizing)."""
    deadline = time.monotonic() + timeout
    while True:
        state = dict(list_devices(address)).get(addr)
        if state not in ("connecting", "authorizing", "offline") or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def connect(addr: str, address: tuple[str, int] | None = None, timeout: float = 15) -> None:
    """``adb connect addr`` through the server (for ``host:port`` phones).

    A device the server still lists as offline (its connection dropped) is
    disconnected and connected again."""
    from adbutils.errors import AdbError

    for attempt in range(2):
        try:
            reply = client(address).connect(addr, timeout=timeout)
        except AdbError as exc:
            raise DeviceError("offline", f"adb server could not connect to {addr}: {exc}") from None
        if "authenticate" in reply:      # "failed to authenticate to x": the phone does not know the key
            raise DeviceError("unauthorized", f"device {addr} is unauthorized: {UNAUTHORIZED_HINT}")
        if "connected to" not in reply:  # "connected to x", "already connected to x"
            raise DeviceError("offline", f"adb server could not connect to {addr}: {reply.strip()[:200]}")
        if _settled_state(addr, address, timeout=3 if attempt == 0 else timeout) != "offline" or attempt:
            return
        disconnect(addr, address)


class ServerTransport:
    """One device of the host adb server (not thread-safe: one per device per worker)."""

    kind = "server"

    def __init__(self, serial: str, address: tuple[str, int] | None = None, io_timeout: float = 30.0):
        self.serial = serial
        self.address = address or server_address()
        self.io_timeout = io_timeout
        self._device = client(self.address).device(serial=serial)
        self._shell_v2: bool | None = None

    def close(self) -> None:
        """Nothing to close: every call opens its own connection to the server."""

    def _error(self, exc: BaseException, doing: str) -> DeviceError:
        from adbutils.errors import AdbConnectionError, AdbTimeout

        if isinstance(exc, DeviceError):
            return exc
        text = " ".join(str(a) for a in exc.args if isinstance(a, str)) or str(exc)
        low = text.lower()
        if isinstance(exc, (AdbTimeout, socket.timeout, TimeoutError)):
            return DeviceError("timeout", f"device {self.serial} did not answer in time while {doing}; "
                                          "check it and retry")
        if "unauthorized" in low:
            return DeviceError("unauthorized", f"device {self.serial} is unauthorized: {UNAUTHORIZED_HINT}")
        if "not found" in low:
            return DeviceError("offline", f"the adb server at {_where(self.address)} has no device {self.serial}; "
                                          "`edgequant devices` lists the reachable ones")
        if "offline" in low:
            return DeviceError("offline", f"device {self.serial} is offline: reconnect it and retry")
        if isinstance(exc, AdbConnectionError):
            return DeviceError("offline", f"cannot reach the adb server at {_where(self.address)}: {text[:200]}")
        if isinstance(exc, (EOFError, ConnectionError, OSError)):
            return DeviceError("offline", f"device {self.serial} dropped the connection while {doing}; "
                                          "check the cable or network and retry")
        if "no space" in low:
            return DeviceError("no_space", f"device {self.serial} ran out of space while {doing}: {text[:200]}")
        if "closed" in low or "refus" in low:
            return DeviceError("refused", f"device {self.serial} refused the service while {doing}: {text[:200]}")
        return DeviceError("io", f"device {self.serial}: {text[:200]} while {doing}")

    def features(self) -> set[str]:
        try:
            return set(self._device.get_features().strip().split(","))
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "reading the device's features") from None

    def shell(self, command: str, timeout: float) -> ShellResult:
        if self._shell_v2 is None:
            self._shell_v2 = "shell_v2" in self.features()
        try:
            if self._shell_v2:
                res = self._device.shell2(command, timeout=timeout, encoding=None, v2=True)
                return ShellResult(res.returncode, res.stdout.decode("utf-8", "replace"),
                                   res.stderr.decode("utf-8", "replace"))
            marker = exitcode.new_marker()
            raw = self._device.shell(exitcode.wrap(command, marker), timeout=timeout, encoding=None)
        except Exception as exc:  # noqa: BLE001 - closing the stream makes adbd hang up the command
            raise self._error(exc, f"running `{command[:60]}`") from None
        return exitcode.unwrap(raw, marker, where=f"device {self.serial}")

    def push(self, local: Path, remote: str, on_progress: ProgressFn | None = None,
             timeout: float | None = None) -> None:
        local = Path(local)
        st = local.stat()
        mode = stat.S_IFREG | (0o755 if st.st_mode & 0o111 else 0o644)
        deadline = None if timeout is None else time.monotonic() + timeout
        header = f"{remote},{mode}".encode()
        try:
            conn = self._device.open_transport(timeout=self.io_timeout)
            try:
                conn.send_command("sync:")
                conn.check_okay()
                sock = conn.conn
                sock.sendall(b"SEND" + struct.pack("<I", len(header)) + header)
                done = pending = 0
                batch = bytearray()
                with open(local, "rb") as fh:
                    while True:
                        chunk = fh.read(SYNC_DATA_MAX)
                        if chunk:
                            batch += b"DATA" + struct.pack("<I", len(chunk))
                            batch += chunk
                            pending += len(chunk)
                        if batch and (len(batch) >= SEND_BATCH or not chunk):
                            if deadline is not None and time.monotonic() > deadline:
                                raise TimeoutError
                            sock.sendall(batch)
                            batch.clear()
                            done, pending = done + pending, 0
                            if on_progress is not None:
                                on_progress(done, st.st_size)
                        if not chunk:
                            break
                sock.sendall(b"DONE" + struct.pack("<I", int(st.st_mtime)))
                reply = conn.read_exact(8)
                if reply[:4] != b"OKAY":
                    length = struct.unpack("<I", reply[4:])[0]
                    message = conn.read_exact(min(length, 4096)).decode("utf-8", "replace")
                    raise DeviceError("no_space" if "space" in message.lower() else "io",
                                      f"device {self.serial} failed to write {remote}: {message.strip()[:200]}")
                conn.send(b"QUIT" + struct.pack("<I", 0))
            finally:
                conn.close()
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"pushing {local.name}") from None

    def pull(self, remote: str, local: Path, timeout: float | None = None) -> None:
        try:
            with atomic_path(Path(local)) as tmp:
                self._device.sync.pull_file(remote, tmp)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"pulling {remote}") from None

"""The ``direct`` transport: adb-shell talking to a phone's adbd, no adb server.

Over TCP (``adb tcpip`` phones, DeviceFarmer/STF endpoints: ``host:port``) or
USB (the ``usb`` extra).  adb-shell 0.4.4 has known faults, fixed here in our
own subclass of its TCP transport, never by patching it:

* it never sets ``TCP_NODELAY``, so every small packet waits for Nagle's
  delayed ACK (a 1 MiB push took 22 s);
* its ``bulk_write`` ignores short ``send()`` counts on its non-blocking
  socket, so a push could stop half-way and hang until the timeout;
* a closed socket reads as endless empty data, so a dropped connection spins
  until the read timeout; we raise at once;
* a service the daemon refuses is answered with a CLSE that adb-shell ignores,
  and a push adbd gives up on (disk full) is answered with a sync ``FAIL``
  while adb-shell waits for an OKAY: both wait for the timeout.  Our
  transport watches the packets go by and fails the next read at once
  (``refused``, or the device's own message such as "No space left").

adb-shell speaks protocol version 0x01000000, so every packet carries a
checksum (the byte sum of its payload), which it computes with Python's
``sum()``: 0.3 s of CPU per 64 MiB pushed, the bottleneck of a push.
:class:`DirectAdbDevice` sends the push's WRTE packets with the same checksum
computed by numpy (when it imports), about 15 times faster.

adb-shell reports no exit status and merges stderr into stdout: commands run
through :mod:`edgequant.devices.exitcode`'s marker.  It is not thread-safe and
never reconnects: one :class:`DirectTransport` per device per worker, and
after any error the connection is closed and made again on the next call.
"""

from __future__ import annotations

import errno
import select
import socket
import stat
import struct
import time
from pathlib import Path

from adb_shell.adb_device import AdbDevice
from adb_shell.adb_message import AdbMessage
from adb_shell.transport.tcp_transport import TcpTransport

from edgequant.devices import exitcode
from edgequant.devices.keys import UNAUTHORIZED_HINT, load_signers
from edgequant.devices.transport import DeviceError, ProgressFn, ShellResult

DEFAULT_PORT = 5555
CONNECT_TIMEOUT_S = 10.0
# How long the phone's owner gets to accept the "Allow USB debugging" prompt.
AUTH_TIMEOUT_S = 30.0
# A transfer that moves no byte for this long is declared stalled.
IO_TIMEOUT_S = 30.0


class _Closed(ConnectionError):
    """The device closed the connection."""


class _Refused(ConnectionError):
    """The device answered an OPEN with CLSE: the service is refused."""


class _SyncFailed(Exception):
    """adbd answered a push with FAIL and stopped reading the file."""


_CLSE = int.from_bytes(b"CLSE", "little")
_WRTE = int.from_bytes(b"WRTE", "little")
_HEADER = struct.Struct("<6I")


class FixedTcpTransport(TcpTransport):
    """adb-shell's TCP transport with TCP_NODELAY, complete writes, EOF detection and a deadline."""

    def __init__(self, host: str, port: int):
        super().__init__(host, port)
        self.deadline: float | None = None   # monotonic time after which any I/O times out
        self._reset_watch()

    def _reset_watch(self):
        self._header = bytearray()   # the packet header being received
        self._skip = 0               # payload bytes still to come of the current packet
        self._payload: bytearray | None = None   # the start of a WRTE payload, while pushing
        self._refused = False
        self._sync_fail: str | None = None
        self.pushing = False         # set by DirectTransport around a push

    def connect(self, transport_timeout_s):
        self._reset_watch()
        super().connect(transport_timeout_s)
        self._connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _watch(self, data: bytes) -> None:
        """Follow packet boundaries in the received bytes and note two answers adb-shell
        would wait on until its timeout: a CLSE whose arg0 is 0 (adbd refusing an OPEN:
        there is no remote stream id yet) and, during a push, a sync ``FAIL`` sent before
        the end of the file (adbd stops reading, e.g. when the disk is full)."""
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                if self._payload is not None and len(self._payload) < 512:
                    self._payload += data[i:i + min(take, 512 - len(self._payload))]
                self._skip -= take
                i += take
                if not self._skip and self._payload is not None:
                    if self._payload[:4] == b"FAIL":
                        self._sync_fail = bytes(self._payload[8:]).decode("utf-8", "replace")
                    self._payload = None
                continue
            take = min(_HEADER.size - len(self._header), n - i)
            self._header += data[i:i + take]
            i += take
            if len(self._header) == _HEADER.size:
                cmd, arg0, _arg1, length, _check, _magic = _HEADER.unpack(self._header)
                self._header = bytearray()
                self._skip = length
                self._payload = bytearray() if self.pushing and cmd == _WRTE and length else None
                if cmd == _CLSE and arg0 == 0:
                    self._refused = True

    def _wait(self, timeout_s):
        if self.deadline is None:
            return timeout_s
        left = self.deadline - time.monotonic()
        if left <= 0:
            from adb_shell.exceptions import TcpTimeoutException

            raise TcpTimeoutException(f"{self._host}:{self._port}: deadline passed")
        return left if timeout_s is None else min(timeout_s, left)

    def bulk_read(self, numbytes, transport_timeout_s):
        if self._refused:  # adb-shell would wait for an OKAY that never comes
            self._refused = False
            raise _Refused(f"{self._host}:{self._port} refused the service")
        if self._sync_fail is not None:
            message, self._sync_fail = self._sync_fail, None
            raise _SyncFailed(message)
        data = super().bulk_read(numbytes, self._wait(transport_timeout_s))
        if not data:
            raise _Closed(f"{self._host}:{self._port} closed the connection")
        self._watch(data)
        return data

    def bulk_write(self, data, transport_timeout_s):
        from adb_shell.exceptions import TcpTimeoutException

        view = memoryview(data)
        sent = 0
        while sent < len(view):
            wait = self._wait(transport_timeout_s)
            _, writable, _ = select.select([], [self._connection], [], wait)
            if not writable:
                raise TcpTimeoutException(f"sending to {self._host}:{self._port} timed out after {wait} s "
                                          f"({sent} of {len(view)} bytes sent)")
            try:
                sent += self._connection.send(view[sent:])
            except (BlockingIOError, InterruptedError):
                continue
        return sent


def byte_sum(data) -> int:
    """ADB's packet checksum: the sum of the payload's bytes, modulo 2**32."""
    try:
        import numpy as np
    except ImportError:
        return sum(data) & 0xFFFFFFFF
    return int(np.frombuffer(data, np.uint8).sum(dtype=np.uint64)) & 0xFFFFFFFF


class _FastSumMessage(AdbMessage):
    @property
    def checksum(self):
        return byte_sum(self.data)


class DirectAdbDevice(AdbDevice):
    """adb-shell's device, whose file-sync data packets get a fast checksum.

    ``_filesync_flush`` is adb-shell's (0.4.x) own four lines with the message
    class swapped; it is overridden only where the base class has it."""

    if hasattr(AdbDevice, "_filesync_flush"):
        def _filesync_flush(self, adb_info, filesync_info):
            from adb_shell import constants

            msg = _FastSumMessage(constants.WRTE, adb_info.local_id, adb_info.remote_id,
                                  filesync_info.send_buffer[:filesync_info.send_idx])
            self._io_manager.send(msg, adb_info)
            self._read_until([constants.OKAY], adb_info)
            filesync_info.send_idx = 0


def parse_address(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare host (port 5555)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.lstrip(":") or str(DEFAULT_PORT)
    elif address.count(":") == 1:
        host, port = address.split(":")
    else:
        host, port = address, str(DEFAULT_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        from edgequant.errors import BadInput

        raise BadInput(f"device address {address!r} is not HOST:PORT (e.g. 192.168.1.20:5555)")
    return host, int(port)


class DirectTransport:
    """A phone's adbd over TCP (``host:port``) or USB (a serial), through adb-shell."""

    kind = "direct"

    def __init__(self, serial: str, *, usb: bool = False, connect_timeout: float = CONNECT_TIMEOUT_S,
                 auth_timeout: float = AUTH_TIMEOUT_S, io_timeout: float = IO_TIMEOUT_S):
        self.serial = serial
        self.usb = usb
        self.connect_timeout = connect_timeout
        self.auth_timeout = auth_timeout
        self.io_timeout = io_timeout
        self._device = None
        self._tcp: FixedTcpTransport | None = None

    # -- connection ---------------------------------------------------------

    def _connected(self):
        if self._device is not None:
            return self._device
        from adb_shell import exceptions as ex

        if self.usb:
            transport = _usb_transport(self.serial)
        else:
            self._tcp = transport = FixedTcpTransport(*parse_address(self.serial))
        device = DirectAdbDevice(transport, default_transport_timeout_s=self.io_timeout)
        asked = []
        try:
            device.connect(rsa_keys=load_signers(), transport_timeout_s=self.connect_timeout,
                           read_timeout_s=self.connect_timeout, auth_timeout_s=self.auth_timeout,
                           auth_callback=lambda _dev: asked.append(True))
        except ex.DeviceAuthError:
            device.close()
            raise DeviceError("unauthorized", f"device {self.serial} is unauthorized: {UNAUTHORIZED_HINT}") from None
        except DeviceError:
            device.close()
            raise
        except Exception as exc:  # noqa: BLE001 - every failure of the handshake becomes one line
            device.close()
            if asked:  # every key was refused and the phone did not accept ours in time
                raise DeviceError("unauthorized",
                                  f"device {self.serial} is unauthorized: {UNAUTHORIZED_HINT}") from None
            raise self._error(exc, "connecting") from None
        self._device = device
        return device

    def close(self) -> None:
        if self._device is not None:
            try:
                self._device.close()
            finally:
                self._device = None

    def _error(self, exc: BaseException, doing: str) -> DeviceError:
        """One line for a failure of adb-shell or of the socket (the connection is then dropped)."""
        from adb_shell import exceptions as ex

        self.close()
        if isinstance(exc, DeviceError):
            return exc
        if isinstance(exc, _Refused):
            return DeviceError("refused", f"device {self.serial} refused the service while {doing} "
                                          "(adbd too old, or a restricted build); check the device")
        if isinstance(exc, (ex.TcpTimeoutException, ex.AdbTimeoutError, socket.timeout, TimeoutError)):
            return DeviceError("timeout", f"device {self.serial} did not answer in time while {doing} "
                                          "(stalled, or the device refused the service); check it and retry")
        if isinstance(exc, ConnectionRefusedError):
            return DeviceError("offline", f"nothing answers at {self.serial} ({exc.strerror}): check the "
                                          "address, that the phone is reachable and `adb tcpip 5555` was run")
        if isinstance(exc, socket.gaierror):
            return DeviceError("offline", f"cannot resolve the device address {self.serial} ({exc.strerror})")
        if isinstance(exc, (_Closed, ConnectionError)) or (isinstance(exc, OSError)
                                                           and exc.errno in (errno.EPIPE, errno.ECONNRESET)):
            return DeviceError("offline", f"device {self.serial} dropped the connection while {doing}; "
                                          "check the cable or network and retry")
        if isinstance(exc, OSError):
            return DeviceError("io", f"device {self.serial}: {exc.strerror or exc} while {doing}")
        if isinstance(exc, (ex.PushFailedError, ex.AdbCommandFailureException, _SyncFailed)):
            detail = exc.args[0] if exc.args else exc
            if isinstance(detail, (bytes, bytearray)):
                detail = detail.decode("utf-8", "replace")
            kind = "no_space" if "space" in str(detail).lower() else "io"
            return DeviceError(kind, f"device {self.serial} failed while {doing}: {str(detail).strip()[:200]}")
        return DeviceError("io", f"device {self.serial}: {type(exc).__name__}: {str(exc)[:200]} while {doing}")

    # -- the Transport interface -------------------------------------------

    def shell(self, command: str, timeout: float) -> ShellResult:
        marker = exitcode.new_marker()
        try:
            device = self._connected()
            self._set_deadline(timeout)
            raw = device.shell(exitcode.wrap(command, marker), transport_timeout_s=timeout,
                               read_timeout_s=timeout, timeout_s=timeout, decode=False)
        except Exception as exc:  # noqa: BLE001
            # closing the stream makes adbd hang up the command's shell
            raise self._error(exc, f"running `{command[:60]}`") from None
        finally:
            self._set_deadline(None)
        try:
            return exitcode.unwrap(raw, marker, where=f"device {self.serial}")
        except DeviceError:
            self.close()
            raise

    def push(self, local: Path, remote: str, on_progress: ProgressFn | None = None,
             timeout: float | None = None) -> None:
        local = Path(local)
        size = local.stat().st_size
        mode = stat.S_IFREG | (0o755 if local.stat().st_mode & 0o111 else 0o644)
        done = 0

        def progress(_path, chunk, _total):
            nonlocal done
            done += chunk
            if on_progress is not None:
                on_progress(done, size)

        try:
            device = self._connected()
            self._set_deadline(timeout)
            if self._tcp is not None:
                self._tcp.pushing = True
            device.push(str(local), remote, st_mode=mode, progress_callback=progress,
                        transport_timeout_s=self.io_timeout, read_timeout_s=self.io_timeout)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"pushing {local.name}") from None
        finally:
            self._set_deadline(None)
            if self._tcp is not None:
                self._tcp.pushing = False

    def pull(self, remote: str, local: Path, timeout: float | None = None) -> None:
        from edgequant.quantize.atomic import atomic_path

        local = Path(local)
        try:
            device = self._connected()
            self._set_deadline(timeout)
            with atomic_path(local) as tmp:
                device.pull(remote, str(tmp), transport_timeout_s=self.io_timeout, read_timeout_s=self.io_timeout)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"pulling {remote}") from None
        finally:
            self._set_deadline(None)

    def _set_deadline(self, seconds: float | None) -> None:
        if self._tcp is not None:
            self._tcp.deadline = None if seconds is None else time.monotonic() + seconds


def _usb_transport(serial: str):
    try:
        from adb_shell.transport.usb_transport import UsbTransport
    except ImportError:
        raise DeviceError("io", f"USB device {serial} needs the usb extra: pip install 'edgequant[usb]' "
                                "(or use the adb server: --device server:SERIAL)") from None
    try:
        return UsbTransport.find_adb(serial=serial)
    except Exception as exc:  # noqa: BLE001 - libusb errors have many types
        if "BUSY" in str(exc):
            raise DeviceError("io", f"USB device {serial} is owned by an adb server: use --device server:{serial} "
                                    "or stop the server with `adb kill-server`") from None
        raise DeviceError("offline", f"USB device {serial} not found ({exc})") from None


def usb_serials() -> list[str]:
    """Serials of phones on USB that adb-shell can open ([] without the usb extra)."""
    try:
        from adb_shell.transport.usb_transport import UsbTransport
    except ImportError:
        return []
    try:
        return [t.serial_number for t in UsbTransport.find_all_adb_devices()]
    except Exception:  # noqa: BLE001 - no libusb, no permission: no USB devices
        return []

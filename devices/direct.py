"""The ``direct`` transport: adb-shell talking to a phone's adbd, no adb server.

Over TCP (``adb tcpip`` phones, DeviceFarmer/STF endpoints: ``host:port``) or
USB (the ``usb`` extra).  adb-shell 0.4.4 has known faults, fixed here in our
own subclass of its TCP transport (``edgequant.devices.adb_wire``), never by patching it:

* it never sets ``TCP_NODELAY``, so every small packet waits for Nagle's
  delayed ACK (a 1 MiB push took 22 s);
* its ``bulk_write`` ignores short ``send()`` counts on its non-blocking
  socket, so a push could stop half-way and hang until the timeout;
* a closed socket reads as endless empty data, so a dropped connection spins
  until the read timeout; we raise at once;
* a service the daemon refuses is answered with a CLSE that adb-shell ignores
  while it waits for the timeout.  Our transport watches the packets go by
  and fails the next read at once (``refused``).  A refusal is a CLSE
  answering an OPEN that was never acknowledged with OKAY: older adbd
  (before the socket shutdown hook) and many embedded and vendor daemons end
  *every* stream with the same CLSE(0, id), which is a normal end once the
  stream was open.

Pushes over TCP do not go through adb-shell's ``push`` (2 KiB chunks whatever
the daemon allows, header and payload in two ``send()`` calls, a wait for
every OKAY): :class:`RawPush` speaks the sync protocol on the connection
itself, in WRTE packets of the maximum payload the daemon announced in its
CNXN, each packet one write.  When the daemon offers ``delayed_ack`` (AOSP's
windowed flow control) it is asked for, and the push keeps its window full
instead of waiting for each OKAY.  A sync ``FAIL`` (disk full) stops it at
once with the device's own message.  Over USB adb-shell's ``push`` is used.

adb-shell speaks protocol version 0x01000000, so every packet carries a
checksum (the byte sum of its payload), which it computes with Python's
``sum()``: 0.3 s of CPU per 64 MiB pushed.  Our pushes (RawPush, and
:class:`DirectAdbDevice`'s over USB) compute the same checksum with numpy
(when it imports), about 15 times faster.

adb-shell reports no exit status and merges stderr into stdout: commands run
through :mod:`edgequant.devices.exitcode`'s marker.  It is not thread-safe and
never reconnects: one :class:`DirectTransport` per device per worker, and
after any error the connection is closed and made again on the next call.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Callable

from adb_shell.adb_device import AdbDevice
from adb_shell.adb_message import AdbMessage

from edgequant.core.atomic import atomic_path
from edgequant.core.errors import BadInput, one_line
from edgequant.devices import exitcode
from edgequant.devices.adb_wire import (A_CLSE, A_OKAY, A_OPEN, A_WRTE, DELAYED_ACK_WINDOW, HOST_BANNER, ConnectionClosed,
                                        FixedTcpTransport, ServiceRefused, SyncFailed, byte_sum, byte_sums)
from edgequant.devices.keys import UNAUTHORIZED_HINT, load_signers
from edgequant.devices.transport import DeviceError, ProgressFn, ShellResult

DEFAULT_PORT = 5555
CONNECT_TIMEOUT_S = 10.0
# How long the phone's owner gets to accept the "Allow USB debugging" prompt.
AUTH_TIMEOUT_S = 30.0
# A transfer that moves no byte for this long is declared stalled.
IO_TIMEOUT_S = 30.0


SYNC_DATA_MAX = 64 * 1024       # the largest sync DATA message adbd takes (file_sync_service.h)
HOST_MAX_PAYLOAD = 1024 * 1024  # what adb-shell announces in its CNXN
_SYNC = struct.Struct("<4sI")
_RAW_ID_BASE = 0x40000000       # RawPush's stream ids; adb-shell counts its own up from 1


def _packets(pieces, size: int, block: int = 1 << 20, checksums: bool = True):
    """The concatenation of ``pieces`` (bytes) cut into payloads of exactly ``size`` bytes (the last
    shorter), each with its checksum (0 without ``checksums``).  Checksums are computed a block
    (1 MiB, or one payload) at a time: one numpy call for 256 payloads of 4 KiB instead of 256."""
    block = max(block - block % size, size)
    buf = bytearray()

    def cut(view: memoryview):
        whole = len(view) - len(view) % size
        sums = byte_sums(view[:whole], size) if whole and checksums else [0] * (whole // size)
        for i, check in enumerate(sums):
            yield view[i * size:(i + 1) * size], check
        if whole < len(view):
            yield view[whole:], byte_sum(view[whole:]) if checksums else 0

    for piece in pieces:
        buf += piece
        if len(buf) >= block:
            data, buf = buf, bytearray()
            whole = len(data) - len(data) % block
            buf += memoryview(data)[whole:]     # less than a block; ``data`` is not changed again
            yield from cut(memoryview(data)[:whole])
    if buf:
        yield from cut(memoryview(buf))


class RawPush:
    """One file to the device over a ``sync:`` stream of its own, on adb-shell's TCP connection.

    The sync v1 messages (SEND path,mode; DATA of at most 64 KiB; DONE mtime) form
    one byte stream, cut into WRTE packets of the negotiated maximum payload, each
    sent as one write.  Without delayed acks one WRTE is in flight, as adbd allows;
    with them the window the daemon granted is kept full.  A sync FAIL from the
    device (disk full, permission) stops the push at once with its message."""

    def __init__(self, tcp: FixedTcpTransport, local_id: int, io_timeout: float):
        self.tcp = tcp
        self.local_id = local_id
        self.remote_id = 0
        self.io_timeout = io_timeout
        self.payload = max(256, min(tcp.device_max_payload or 4096, HOST_MAX_PAYLOAD))
        self.window: int | None = None      # delayed_ack: bytes the device still accepts
        self._acked = True                  # without delayed acks: our last WRTE was acknowledged
        self._reply = bytearray()           # what the device wrote on the stream (its sync answer)

    def run(self, local: Path, remote: str, mode: int, progress: Callable[[int], None]) -> None:
        self._open()
        for payload, check in _packets(self._sync_stream(local, remote, mode, progress), self.payload,
                                       checksums=self.tcp.needs_checksums):
            self._write(payload, check)
        while not self._answered():
            self._handle(*self.tcp.read_packet(self.io_timeout))
        self.tcp.send_packet(A_CLSE, self.local_id, self.remote_id, timeout_s=self.io_timeout)
        self._until(lambda: self.remote_id == 0)

    @staticmethod
    def _sync_stream(local: Path, remote: str, mode: int, progress: Callable[[int], None]):
        spec = f"{remote},{mode}".encode("utf-8", "surrogateescape")
        yield _SYNC.pack(b"SEND", len(spec)) + spec
        with open(local, "rb") as fh:
            mtime = int(os.fstat(fh.fileno()).st_mtime) & 0xFFFFFFFF
            while data := fh.read(SYNC_DATA_MAX):
                yield _SYNC.pack(b"DATA", len(data))
                yield data
                progress(len(data))
        yield _SYNC.pack(b"DONE", mtime)

    def _open(self) -> None:
        tcp = self.tcp
        tcp.send_packet(A_OPEN, self.local_id, DELAYED_ACK_WINDOW if tcp.delayed_ack else 0, b"sync:\0",
                        timeout_s=self.io_timeout)
        while True:
            cmd, arg0, arg1, payload = tcp.read_packet(self.io_timeout)
            if arg1 != self.local_id:
                continue                        # a late packet of a stream adb-shell already closed
            if cmd == A_OKAY:
                self.remote_id = arg0
                if len(payload) == 4:
                    self.window = struct.unpack("<i", payload)[0]
                return
            if cmd == A_CLSE:
                tcp.refusal_handled()
                raise ServiceRefused(f"{tcp.address} refused the sync service")

    def _write(self, payload, check: int) -> None:
        if self.window is None:
            self._until(lambda: self._acked)
            self._acked = False
        else:
            self._until(lambda: self.window > 0)
            self.window -= len(payload)
            self._poll()
        self.tcp.send_packet(A_WRTE, self.local_id, self.remote_id, payload, timeout_s=self.io_timeout, check=check)

    def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            self._handle(*self.tcp.read_packet(self.io_timeout))

    def _poll(self) -> None:
        """Handle what the device already sent (an early FAIL), without waiting."""
        while self.tcp.readable():
            self._handle(*self.tcp.read_packet(self.io_timeout))

    def _handle(self, cmd: int, arg0: int, arg1: int, payload: bytes) -> None:
        if arg1 != self.local_id or self.remote_id == 0:
            return
        if cmd == A_OKAY:
            if self.window is None:
                self._acked = True
            elif len(payload) == 4:
                self.window += struct.unpack("<i", payload)[0]
        elif cmd == A_WRTE:
            self._reply += payload
            ack = struct.pack("<i", len(payload)) if self.window is not None else b""
            self.tcp.send_packet(A_OKAY, self.local_id, self.remote_id, ack, timeout_s=self.io_timeout)
            self._answered()
        elif cmd == A_CLSE:
            self.remote_id = 0
            if not self._answered():
                raise SyncFailed("the device closed the file transfer before it finished")

    def _answered(self) -> bool:
        """True once the device said OKAY to the file; raises on its FAIL."""
        if len(self._reply) < _SYNC.size:
            return False
        kind, length = _SYNC.unpack_from(self._reply)
        if kind == b"OKAY":
            return True
        if kind == b"FAIL":
            if len(self._reply) < _SYNC.size + length and self.remote_id:
                return False
            raise SyncFailed(bytes(self._reply[_SYNC.size:_SYNC.size + length]).decode("utf-8", "replace"))
        raise SyncFailed(f"unexpected sync answer {bytes(self._reply[:4])!r}")


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
        raise BadInput(f"device address {address!r} is not HOST:PORT (e.g. 192.168.1.20:5555)")
    return host, int(port)


class DirectTransport:
    """A phone's adbd over TCP (``host:port``) or USB (a serial), through adb-shell."""

    kind = "direct"
    tcp_class = FixedTcpTransport

    def __init__(self, serial: str, *, usb: bool = False, connect_timeout: float = CONNECT_TIMEOUT_S,
                 auth_timeout: float = AUTH_TIMEOUT_S, io_timeout: float = IO_TIMEOUT_S):
        self.serial = serial
        self.usb = usb
        self.connect_timeout = connect_timeout
        self.auth_timeout = auth_timeout
        self.io_timeout = io_timeout
        self._device = None
        self._tcp: FixedTcpTransport | None = None
        self._raw_ids = 0

    # -- connection ---------------------------------------------------------

    def _connected(self):
        if self._device is not None:
            return self._device
        from adb_shell import exceptions as ex

        if self.usb:
            transport = _usb_transport(self.serial)
        else:
            self._tcp = transport = self.tcp_class(*parse_address(self.serial))
        device = DirectAdbDevice(transport, default_transport_timeout_s=self.io_timeout,
                                 banner=HOST_BANNER if self._tcp is not None else None)
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

    def _error(self, exc: BaseException, doing: str, service: str = "") -> DeviceError:
        """One line for a failure of adb-shell or of the socket (the connection is then dropped)."""
        from adb_shell import exceptions as ex

        self.close()
        if isinstance(exc, DeviceError):
            return exc
        if isinstance(exc, ServiceRefused):
            return DeviceError("refused", f"device {self.serial} refused the {service or 'requested'} service "
                                          f"while {doing} (adbd too old, or a restricted build); check the device")
        if isinstance(exc, SyncFailed):
            detail = one_line(exc.args[0] if exc.args else exc, 200)
            kind = "no_space" if "space" in detail.lower() else "io"
            return DeviceError(kind, f"device {self.serial} failed while {doing}: {detail}")
        if isinstance(exc, (ex.TcpTimeoutException, ex.AdbTimeoutError, socket.timeout, TimeoutError)):
            return DeviceError("timeout", f"device {self.serial} did not answer in time while {doing} "
                                          "(stalled, or the device refused the service); check it and retry")
        if isinstance(exc, ConnectionRefusedError):
            return DeviceError("offline", f"nothing answers at {self.serial} ({exc.strerror}): check the "
                                          "address, that the phone is reachable and `adb tcpip 5555` was run")
        if isinstance(exc, socket.gaierror):
            return DeviceError("offline", f"cannot resolve the device address {self.serial} ({exc.strerror})")
        if isinstance(exc, (ConnectionClosed, ConnectionError)) or (isinstance(exc, OSError)
                                                           and exc.errno in (errno.EPIPE, errno.ECONNRESET)):
            return DeviceError("offline", f"device {self.serial} dropped the connection while {doing}; "
                                          "check the cable or network and retry")
        if isinstance(exc, OSError):
            return DeviceError("io", f"device {self.serial}: {exc.strerror or exc} while {doing}")
        if isinstance(exc, (ex.PushFailedError, ex.AdbCommandFailureException)):
            detail = exc.args[0] if exc.args else exc
            if isinstance(detail, (bytes, bytearray)):
                detail = detail.decode("utf-8", "replace")
            detail = one_line(detail, 200)
            kind = "no_space" if "space" in detail.lower() else "io"
            return DeviceError(kind, f"device {self.serial} failed while {doing}: {detail}")
        return DeviceError("io", f"device {self.serial}: {type(exc).__name__}: {one_line(exc, 200)} while {doing}")

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
            raise self._error(exc, f"running `{one_line(command, 60)}`", "shell:") from None
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
                self._raw_ids = (self._raw_ids + 1) % _RAW_ID_BASE
                RawPush(self._tcp, _RAW_ID_BASE + self._raw_ids, self.io_timeout).run(
                    local, remote, mode, lambda n: progress(remote, n, size))
            else:
                device.push(str(local), remote, st_mode=mode, progress_callback=progress,
                            transport_timeout_s=self.io_timeout, read_timeout_s=self.io_timeout)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"pushing {one_line(local.name, 80)}", "sync:") from None
        finally:
            self._set_deadline(None)

    def pull(self, remote: str, local: Path, timeout: float | None = None) -> None:
        local = Path(local)
        try:
            device = self._connected()
            self._set_deadline(timeout)
            with atomic_path(local) as tmp:
                device.pull(remote, str(tmp), transport_timeout_s=self.io_timeout, read_timeout_s=self.io_timeout)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, f"pulling {one_line(remote, 120)}", "sync:") from None
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

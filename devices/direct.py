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
import select
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Callable

from adb_shell.adb_device import AdbDevice
from adb_shell.adb_message import AdbMessage
from adb_shell.transport.tcp_transport import TcpTransport

from edgequant.core.atomic import atomic_path
from edgequant.core.errors import BadInput, one_line
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


_CNXN = int.from_bytes(b"CNXN", "little")
_OPEN = int.from_bytes(b"OPEN", "little")
_OKAY = int.from_bytes(b"OKAY", "little")
_CLSE = int.from_bytes(b"CLSE", "little")
_WRTE = int.from_bytes(b"WRTE", "little")
_HEADER = struct.Struct("<6I")
# Protocol versions: since A_VERSION_SKIP_CHECKSUM a side may send 0 instead of the payload's byte sum
A_VERSION_MIN = 0x01000000
A_VERSION_SKIP_CHECKSUM = 0x01000001
# delayed_ack: the window granted when a stream opens (AOSP adb.h INITIAL_DELAYED_ACK_BYTES)
DELAYED_ACK_WINDOW = 32 * 1024 * 1024
# The features our CNXN banner asks for.  adbd splits the banner's properties on ';' and keeps the
# banner's trailing NUL (which adb-shell adds) in the last one, so the list ends with a ';'.
HOST_BANNER = "features=delayed_ack;"


class FixedTcpTransport(TcpTransport):
    """adb-shell's TCP transport with TCP_NODELAY, complete writes, EOF detection and a deadline."""

    def __init__(self, host: str, port: int, offer_delayed_ack: bool = True):
        super().__init__(host, port)
        self.deadline: float | None = None   # monotonic time after which any I/O times out
        self.offer_delayed_ack = offer_delayed_ack   # our CNXN banner asks for delayed acks (HOST_BANNER)
        self._reset_watch()

    def _reset_watch(self):
        self._header = bytearray()   # the packet header being received
        self._skip = 0               # payload bytes still to come of the current packet
        self._cnxn: bytearray | None = None      # the device's CNXN banner, while it arrives
        self._out_header = bytearray()   # the packet header being sent
        self._out_skip = 0               # payload bytes still to go of the packet being sent
        self._opening: set[int] = set()  # local ids of OPENs sent and not yet answered
        self._unacked: dict[int, int] = {}   # delayed_ack: WRTE bytes received per local id, not yet acked
        self._refused = False
        self._rbuf = bytearray()     # bytes read by read_packet beyond the packets it returned
        self.device_version = 0      # from the device's CNXN
        self.device_max_payload = 0
        self.device_features: frozenset[str] = frozenset()
        self.delayed_ack = False     # both CNXN banners list delayed_ack

    def connect(self, transport_timeout_s):
        self._reset_watch()
        super().connect(transport_timeout_s)
        self._connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connection.setblocking(False)     # every wait goes through select() with our deadline

    def _watch(self, data: bytes) -> None:
        """Follow packet boundaries in the received bytes, note the device's CNXN, and note
        the answer adb-shell would wait on until its timeout: a CLSE answering an OPEN that no
        OKAY answered (adbd refusing the service).  A CLSE(0, id) ending a stream that was open
        is a normal end, the way older daemons close every stream."""
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                if self._cnxn is not None:
                    self._cnxn += data[i:i + take]
                self._skip -= take
                i += take
                if not self._skip and self._cnxn is not None:
                    self._device_banner(bytes(self._cnxn))
                    self._cnxn = None
                continue
            take = min(_HEADER.size - len(self._header), n - i)
            self._header += data[i:i + take]
            i += take
            if len(self._header) == _HEADER.size:
                cmd, arg0, arg1, length, _check, _magic = _HEADER.unpack(self._header)
                self._header = bytearray()
                self._skip = length
                self.seen(cmd, arg0, arg1, length)
                if cmd == _CNXN:
                    self.device_version, self.device_max_payload = arg0, arg1
                    self._cnxn = bytearray() if 0 < length <= 65536 else None
                    if self._cnxn is None:
                        self._device_banner(b"")

    def seen(self, cmd: int, arg0: int, arg1: int, length: int) -> None:
        """Keep the stream table up to date with one packet received from the device."""
        if cmd == _OKAY:
            self._opening.discard(arg1)
        elif cmd == _CLSE:
            self._unacked.pop(arg1, None)
            if arg1 in self._opening:        # an OPEN answered with CLSE: refused
                self._opening.discard(arg1)
                self._refused = True
        elif cmd == _WRTE and self.delayed_ack:
            self._unacked[arg1] = self._unacked.get(arg1, 0) + length

    def _device_banner(self, banner: bytes) -> None:
        """``device::ro.product.name=...;features=a,b``: note the features (split as adbd does)."""
        features: set[str] = set()
        for prop in banner.decode("utf-8", "replace").partition("::")[2].split(";"):
            key, _, value = prop.partition("=")
            if key == "features":
                features = set(value.rstrip("\0").split(","))
        self.device_features = frozenset(features)
        self.delayed_ack = self.offer_delayed_ack and "delayed_ack" in features

    def _sent(self, data) -> bytes:
        """Follow the packets we send: note OPENs, and under delayed acks give adb-shell's OPENs a
        window and its OKAYs the byte count adbd then expects (AOSP: an OPEN's arg1 must be
        non-zero, and every OKAY carry the bytes consumed, exactly when delayed acks are on)."""
        if self._out_skip >= len(data):
            self._out_skip -= len(data)
            return data
        out = None
        i, n = 0, len(data)
        while i < n:
            if self._out_skip:
                take = min(self._out_skip, n - i)
                self._out_skip -= take
                i += take
                continue
            take = min(_HEADER.size - len(self._out_header), n - i)
            start = i - len(self._out_header)
            self._out_header += bytes(data[i:i + take])
            i += take
            if len(self._out_header) < _HEADER.size:
                continue
            cmd, arg0, arg1, length, check, magic = _HEADER.unpack(self._out_header)
            self._out_header = bytearray()
            self._out_skip = length
            if cmd == _CNXN and arg0 < A_VERSION_SKIP_CHECKSUM and start >= 0:
                # skip checksums where the device allows it: a push of 1 MiB packets otherwise spends
                # a millisecond per MiB on each side summing bytes TCP already checks
                out = out if out is not None else bytearray(data)
                out[start:start + _HEADER.size] = _HEADER.pack(cmd, A_VERSION_SKIP_CHECKSUM, arg1, length,
                                                                check, magic)
            elif cmd == _OPEN:
                self._opening.add(arg0)
                if self.delayed_ack and arg1 == 0 and start >= 0:
                    out = out if out is not None else bytearray(data)
                    out[start:start + _HEADER.size] = _HEADER.pack(cmd, arg0, DELAYED_ACK_WINDOW, length,
                                                                    check, magic)
            elif cmd == _OKAY and self.delayed_ack and length == 0 and start >= 0 and i == n:
                acked = struct.pack("<i", min(self._unacked.pop(arg0, 0), 0x7FFFFFFF))
                out = out if out is not None else bytearray(data)
                out[start:start + _HEADER.size] = _HEADER.pack(cmd, arg0, arg1, 4, sum(acked), magic)
                out += acked
        return data if out is None else bytes(out)

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
        if numbytes == _HEADER.size and not self._header and not self._skip:
            self._fill_checksum(transport_timeout_s)
        if self._rbuf:
            data = bytes(self._rbuf[:numbytes])
            del self._rbuf[:numbytes]
        else:
            data = self._recv(numbytes, transport_timeout_s)
        self._watch(data)
        return data

    def _fill_checksum(self, timeout_s: float | None) -> None:
        """adb-shell asks for a packet header: read the whole packet, and when the device left its
        checksum 0 (as it may since A_VERSION_SKIP_CHECKSUM) put the byte sum adb-shell checks in it."""
        buf = self._rbuf
        while len(buf) < _HEADER.size:
            buf += self._recv(1 << 16, timeout_s)
        length, check = struct.unpack_from("<II", buf, 12)
        if check or not length:
            return
        while len(buf) < _HEADER.size + length:
            buf += self._recv(max(1 << 16, _HEADER.size + length - len(buf)), timeout_s)
        struct.pack_into("<I", buf, 16, byte_sum(bytes(buf[_HEADER.size:_HEADER.size + length])))

    def _recv(self, numbytes: int, timeout_s: float | None) -> bytes:
        """Up to ``numbytes`` bytes: at once when some are there, else after select() (one syscall less)."""
        try:
            data = self._connection.recv(numbytes)
        except (BlockingIOError, InterruptedError):
            data = super().bulk_read(numbytes, self._wait(timeout_s))
        if not data:
            raise _Closed(f"{self._host}:{self._port} closed the connection")
        return data

    def bulk_write(self, data, transport_timeout_s):
        written = len(data)
        self._send_all(self._sent(data), transport_timeout_s)
        return written

    def _send_all(self, data, transport_timeout_s):
        from adb_shell.exceptions import TcpTimeoutException

        view = memoryview(data)
        sent = 0
        while sent < len(view):
            try:        # send first, wait only when the socket buffer is full
                sent += self._connection.send(view[sent:])
                continue
            except (BlockingIOError, InterruptedError):
                pass
            wait = self._wait(transport_timeout_s)
            _, writable, _ = select.select([], [self._connection], [], wait)
            if not writable:
                raise TcpTimeoutException(f"sending to {self._host}:{self._port} timed out after {wait} s "
                                          f"({sent} of {len(view)} bytes sent)")
        return sent

    # -- whole packets, for RawPush ------------------------------------------

    @property
    def needs_checksums(self) -> bool:
        """Whether the device expects the payload's byte sum in each packet (it announced a version
        before A_VERSION_SKIP_CHECKSUM; we announce that one, in place of adb-shell's 0x01000000)."""
        return self.device_version < A_VERSION_SKIP_CHECKSUM

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    def refusal_handled(self) -> None:
        """The refusal was answered by the caller, not on adb-shell's next read."""
        self._refused = False

    def readable(self) -> bool:
        """Whether the device already sent something (no wait)."""
        return bool(self._rbuf) or (self._connection is not None
                                    and bool(select.select([self._connection], [], [], 0)[0]))

    def send_packet(self, cmd: int, arg0: int, arg1: int, payload=b"", timeout_s: float | None = None,
                    check: int | None = None) -> None:
        """One packet in one write: header and payload together.  ``check`` is the payload's byte sum
        when the caller has it (adb-shell announces version 0x01000000: every payload carries it)."""
        if check is None:
            check = byte_sum(payload) if payload and self.needs_checksums else 0
        if cmd == _OPEN:
            self._opening.add(arg0)
        # whole packets keep _sent's parser at a packet boundary, so it need not look at them
        self._send_all(_HEADER.pack(cmd, arg0, arg1, len(payload), check, cmd ^ 0xFFFFFFFF) + payload, timeout_s)

    def read_packet(self, timeout_s: float | None) -> tuple[int, int, int, bytes]:
        """The next whole packet from the device (the stream table is kept up to date).

        Reads what is there (several small packets in one call); the rest waits in a buffer
        that adb-shell's own reads (``bulk_read``) take first."""
        buf = self._rbuf
        while len(buf) < _HEADER.size:
            buf += self._recv(1 << 16, timeout_s)
        cmd, arg0, arg1, length, _check, _magic = _HEADER.unpack_from(buf)
        end = _HEADER.size + length
        while len(buf) < end:
            buf += self._recv(max(1 << 16, end - len(buf)), timeout_s)
        payload = bytes(buf[_HEADER.size:end])
        del buf[:end]
        self.seen(cmd, arg0, arg1, length)
        return cmd, arg0, arg1, payload


def byte_sum(data) -> int:
    """ADB's packet checksum: the sum of the payload's bytes, modulo 2**32."""
    try:
        import numpy as np
    except ImportError:
        return sum(data) & 0xFFFFFFFF
    return int(np.frombuffer(data, np.uint8).sum(dtype=np.uint64)) & 0xFFFFFFFF


SYNC_DATA_MAX = 64 * 1024       # the largest sync DATA message adbd takes (file_sync_service.h)
HOST_MAX_PAYLOAD = 1024 * 1024  # what adb-shell announces in its CNXN
_SYNC = struct.Struct("<4sI")
_RAW_ID_BASE = 0x40000000       # RawPush's stream ids; adb-shell counts its own up from 1


def byte_sums(data, size: int) -> list[int]:
    """The checksums of ``data`` cut in payloads of ``size`` bytes (``len(data)`` a multiple of it)."""
    try:
        import numpy as np
    except ImportError:
        return [sum(data[i:i + size]) & 0xFFFFFFFF for i in range(0, len(data), size)]
    sums = np.frombuffer(data, np.uint8).reshape(-1, size).sum(axis=1, dtype=np.uint64) & 0xFFFFFFFF
    return sums.tolist()


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
        self.tcp.send_packet(_CLSE, self.local_id, self.remote_id, timeout_s=self.io_timeout)
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
        tcp.send_packet(_OPEN, self.local_id, DELAYED_ACK_WINDOW if tcp.delayed_ack else 0, b"sync:\0",
                        timeout_s=self.io_timeout)
        while True:
            cmd, arg0, arg1, payload = tcp.read_packet(self.io_timeout)
            if arg1 != self.local_id:
                continue                        # a late packet of a stream adb-shell already closed
            if cmd == _OKAY:
                self.remote_id = arg0
                if len(payload) == 4:
                    self.window = struct.unpack("<i", payload)[0]
                return
            if cmd == _CLSE:
                tcp.refusal_handled()
                raise _Refused(f"{tcp.address} refused the sync service")

    def _write(self, payload, check: int) -> None:
        if self.window is None:
            self._until(lambda: self._acked)
            self._acked = False
        else:
            self._until(lambda: self.window > 0)
            self.window -= len(payload)
            self._poll()
        self.tcp.send_packet(_WRTE, self.local_id, self.remote_id, payload, timeout_s=self.io_timeout, check=check)

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
        if cmd == _OKAY:
            if self.window is None:
                self._acked = True
            elif len(payload) == 4:
                self.window += struct.unpack("<i", payload)[0]
        elif cmd == _WRTE:
            self._reply += payload
            ack = struct.pack("<i", len(payload)) if self.window is not None else b""
            self.tcp.send_packet(_OKAY, self.local_id, self.remote_id, ack, timeout_s=self.io_timeout)
            self._answered()
        elif cmd == _CLSE:
            self.remote_id = 0
            if not self._answered():
                raise _SyncFailed("the device closed the file transfer before it finished")

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
            raise _SyncFailed(bytes(self._reply[_SYNC.size:_SYNC.size + length]).decode("utf-8", "replace"))
        raise _SyncFailed(f"unexpected sync answer {bytes(self._reply[:4])!r}")


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
        if isinstance(exc, _Refused):
            return DeviceError("refused", f"device {self.serial} refused the {service or 'requested'} service "
                                          f"while {doing} (adbd too old, or a restricted build); check the device")
        if isinstance(exc, _SyncFailed):
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
        if isinstance(exc, (_Closed, ConnectionError)) or (isinstance(exc, OSError)
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

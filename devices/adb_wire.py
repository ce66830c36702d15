"""The adb wire under the ``direct`` transport: packet commands and header, and adb-shell's TCP transport
with its faults fixed in our own subclass (``FixedTcpTransport``; see ``edgequant.devices.direct``).

Command names and values mirror AOSP's ``adb.h`` (``A_CNXN`` ...): each is the command's four ASCII
letters read as a little-endian 32-bit integer.
"""

from __future__ import annotations

import select
import socket
import struct
import time

from adb_shell.transport.tcp_transport import TcpTransport


class ConnectionClosed(ConnectionError):
    """The device closed the connection."""


class ServiceRefused(ConnectionError):
    """The device answered an OPEN with CLSE: the service is refused."""


class SyncFailed(Exception):
    """adbd answered a push with FAIL and stopped reading the file."""


A_CNXN = int.from_bytes(b"CNXN", "little")
A_OPEN = int.from_bytes(b"OPEN", "little")
A_OKAY = int.from_bytes(b"OKAY", "little")
A_CLSE = int.from_bytes(b"CLSE", "little")
A_WRTE = int.from_bytes(b"WRTE", "little")
PACKET_HEADER = struct.Struct("<6I")
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
            take = min(PACKET_HEADER.size - len(self._header), n - i)
            self._header += data[i:i + take]
            i += take
            if len(self._header) == PACKET_HEADER.size:
                cmd, arg0, arg1, length, _check, _magic = PACKET_HEADER.unpack(self._header)
                self._header = bytearray()
                self._skip = length
                self.seen(cmd, arg0, arg1, length)
                if cmd == A_CNXN:
                    self.device_version, self.device_max_payload = arg0, arg1
                    self._cnxn = bytearray() if 0 < length <= 65536 else None
                    if self._cnxn is None:
                        self._device_banner(b"")

    def seen(self, cmd: int, arg0: int, arg1: int, length: int) -> None:
        """Keep the stream table up to date with one packet received from the device."""
        if cmd == A_OKAY:
            self._opening.discard(arg1)
        elif cmd == A_CLSE:
            self._unacked.pop(arg1, None)
            if arg1 in self._opening:        # an OPEN answered with CLSE: refused
                self._opening.discard(arg1)
                self._refused = True
        elif cmd == A_WRTE and self.delayed_ack:
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
            take = min(PACKET_HEADER.size - len(self._out_header), n - i)
            start = i - len(self._out_header)
            self._out_header += bytes(data[i:i + take])
            i += take
            if len(self._out_header) < PACKET_HEADER.size:
                continue
            cmd, arg0, arg1, length, check, magic = PACKET_HEADER.unpack(self._out_header)
            self._out_header = bytearray()
            self._out_skip = length
            if cmd == A_CNXN and arg0 < A_VERSION_SKIP_CHECKSUM and start >= 0:
                # skip checksums where the device allows it: a push of 1 MiB packets otherwise spends
                # a millisecond per MiB on each side summing bytes TCP already checks
                out = out if out is not None else bytearray(data)
                out[start:start + PACKET_HEADER.size] = PACKET_HEADER.pack(cmd, A_VERSION_SKIP_CHECKSUM, arg1, length,
                                                                check, magic)
            elif cmd == A_OPEN:
                self._opening.add(arg0)
                if self.delayed_ack and arg1 == 0 and start >= 0:
                    out = out if out is not None else bytearray(data)
                    out[start:start + PACKET_HEADER.size] = PACKET_HEADER.pack(cmd, arg0, DELAYED_ACK_WINDOW, length,
                                                                    check, magic)
            elif cmd == A_OKAY and self.delayed_ack and length == 0 and start >= 0 and i == n:
                acked = struct.pack("<i", min(self._unacked.pop(arg0, 0), 0x7FFFFFFF))
                out = out if out is not None else bytearray(data)
                out[start:start + PACKET_HEADER.size] = PACKET_HEADER.pack(cmd, arg0, arg1, 4, sum(acked), magic)
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
            raise ServiceRefused(f"{self._host}:{self._port} refused the service")
        if numbytes == PACKET_HEADER.size and not self._header and not self._skip:
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
        while len(buf) < PACKET_HEADER.size:
            buf += self._recv(1 << 16, timeout_s)
        length, check = struct.unpack_from("<II", buf, 12)
        if check or not length:
            return
        while len(buf) < PACKET_HEADER.size + length:
            buf += self._recv(max(1 << 16, PACKET_HEADER.size + length - len(buf)), timeout_s)
        struct.pack_into("<I", buf, 16, byte_sum(bytes(buf[PACKET_HEADER.size:PACKET_HEADER.size + length])))

    def _recv(self, numbytes: int, timeout_s: float | None) -> bytes:
        """Up to ``numbytes`` bytes: at once when some are there, else after select() (one syscall less)."""
        try:
            data = self._connection.recv(numbytes)
        except (BlockingIOError, InterruptedError):
            data = super().bulk_read(numbytes, self._wait(timeout_s))
        if not data:
            raise ConnectionClosed(f"{self._host}:{self._port} closed the connection")
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
        if cmd == A_OPEN:
            self._opening.add(arg0)
        # whole packets keep _sent's parser at a packet boundary, so it need not look at them
        self._send_all(PACKET_HEADER.pack(cmd, arg0, arg1, len(payload), check, cmd ^ 0xFFFFFFFF) + payload, timeout_s)

    def read_packet(self, timeout_s: float | None) -> tuple[int, int, int, bytes]:
        """The next whole packet from the device (the stream table is kept up to date).

        Reads what is there (several small packets in one call); the rest waits in a buffer
        that adb-shell's own reads (``bulk_read``) take first."""
        buf = self._rbuf
        while len(buf) < PACKET_HEADER.size:
            buf += self._recv(1 << 16, timeout_s)
        cmd, arg0, arg1, length, _check, _magic = PACKET_HEADER.unpack_from(buf)
        end = PACKET_HEADER.size + length
        while len(buf) < end:
            buf += self._recv(max(1 << 16, end - len(buf)), timeout_s)
        payload = bytes(buf[PACKET_HEADER.size:end])
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


def byte_sums(data, size: int) -> list[int]:
    """The checksums of ``data`` cut in payloads of ``size`` bytes (``len(data)`` a multiple of it)."""
    try:
        import numpy as np
    except ImportError:
        return [sum(data[i:i + size]) & 0xFFFFFFFF for i in range(0, len(data), size)]
    sums = np.frombuffer(data, np.uint8).reshape(-1, size).sum(axis=1, dtype=np.uint64) & 0xFFFFFFFF
    return sums.tolist()

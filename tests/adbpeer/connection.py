"""One host connection: the CNXN/AUTH handshake and the OPEN/OKAY/WRTE/CLSE streams.

Threads: one reader per connection (parses messages, routes them); one thread
per opened stream running its service.  Sends are serialised by a lock, so a
full TCP send buffer blocks the sender, as it blocks adbd.

Flow control as adbd does it without ``delayed_ack``: a stream has at most one
WRTE in flight towards the host and waits for its OKAY before the next; a
WRTE from the host is acknowledged with OKAY once the service has taken the
data.  The host therefore never has more than one unacknowledged WRTE queued.

With ``delayed_ack`` (both CNXN banners list it; AOSP's docs/dev/delayed_ack.md
and adb.cpp/sockets.cpp): an OPEN's arg1 is the window the host grants (it
must be non-zero exactly when delayed acks are on, or the OPEN is refused),
the OKAY answering it carries the device's window as a 4-byte little-endian
payload, and every later OKAY carries the bytes just consumed, which the
other side adds to its window.  Each side sends while its window is positive.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import traceback
from collections import deque
from typing import TYPE_CHECKING, Callable

from . import keys, wire
from .wire import (A_AUTH, A_CLSE, A_CNXN, A_OKAY, A_OPEN, A_STLS, A_SYNC, A_WRTE, AUTH_RSAPUBLICKEY,
                   AUTH_SIGNATURE, AUTH_TOKEN, ProtocolError)

if TYPE_CHECKING:
    from .peer import AdbPeer


class StreamClosed(Exception):
    """The stream (or the whole connection) is gone."""


class Stream:
    """A device-side socket: the service reads host data and writes replies here."""

    def __init__(self, conn: Connection, local_id: int, remote_id: int, service: str,
                 window: int | None = None):
        self.conn = conn
        self.local_id = local_id
        self.remote_id = remote_id
        self.service = service
        self.closed = False
        self._cv = threading.Condition()
        self._inbox: deque[bytes] = deque()
        self._unacked = 0              # host bytes received and not yet acknowledged
        self._can_send = True          # the first WRTE may follow our OKAY directly
        self.window = window           # delayed_ack: bytes the host still accepts; None: one WRTE at a time
        self._write_lock = threading.Lock()
        self._on_close: list[Callable[[], None]] = []

    # -- host -> device ------------------------------------------------------
    def deliver(self, data: bytes) -> None:
        with self._cv:
            if not self.closed:
                self._inbox.append(data)
                self._unacked += len(data)
                self.conn.peer.note_host_write(len(data), self._unacked)
                self._cv.notify_all()

    def read(self) -> bytes:
        """The next WRTE payload from the host (acknowledged now), or b"" once closed.  A peer with
        ``read_delay`` set consumes each payload that much later (a slow device), so a host that keeps
        several WRTEs in flight is seen doing so whatever the machine's speed."""
        delay = getattr(self.conn.peer, "read_delay", 0.0)
        if delay:
            time.sleep(delay)
        with self._cv:
            while not self._inbox and not self.closed:
                self._cv.wait()
            if not self._inbox:
                return b""
            data = self._inbox.popleft()
            self._unacked -= len(data)
            still_open = not self.closed
        if still_open:
            try:
                self.conn.send(A_OKAY, self.local_id, self.remote_id, self.conn.ack_payload(self, len(data)))
            except StreamClosed:
                pass
        return data

    # -- device -> host ------------------------------------------------------
    def okay(self, acked: int | None = None) -> None:
        with self._cv:
            if self.window is not None:
                if acked is None:          # adbd logs "delayed ack mismatch" and ignores the packet
                    return
                self.window += acked
            self._can_send = True
            self._cv.notify_all()

    def _may_send(self) -> bool:
        return self._can_send if self.window is None else self.window > 0

    def write(self, data: bytes) -> None:
        """Send ``data`` as WRTEs of at most the negotiated payload, each acknowledged."""
        step = self.conn.max_payload
        view = memoryview(data)
        with self._write_lock:
            for offset in range(0, len(view), step):
                chunk = bytes(view[offset:offset + step])
                with self._cv:
                    while not self._may_send() and not self.closed:
                        self._cv.wait()
                    if self.closed:
                        raise StreamClosed(self.service)
                    if self.window is None:
                        self._can_send = False
                    else:
                        self.window -= len(chunk)
                self.conn.send(A_WRTE, self.local_id, self.remote_id, chunk)

    # -- closing -------------------------------------------------------------
    def on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the host closes the stream or the connection drops."""
        self._on_close.append(callback)

    def _mark_closed(self) -> bool:
        with self._cv:
            if self.closed:
                return False
            self.closed = True
            self._cv.notify_all()
        self.conn.forget(self)
        return True

    def close(self) -> None:
        """The service is done: CLSE to the host, once it acknowledged our last WRTE.

        adbd reads the service's EOF only when the host is ready for more, so its
        CLSE never overtakes the OKAY of the last WRTE; a host that never acks
        keeps the stream open, on adbd as here."""
        with self._write_lock, self._cv:
            while self.window is None and not self._can_send and not self.closed:
                self._cv.wait()
        if self._mark_closed():
            try:
                self.conn.send(A_CLSE, self.conn.close_arg0(self), self.remote_id)
            except StreamClosed:
                pass

    def host_closed(self) -> None:
        """The host sent CLSE: answer with CLSE, as adbd's local socket does, then stop the service."""
        if self._mark_closed():
            try:
                self.conn.send(A_CLSE, self.conn.close_arg0(self), self.remote_id)
            except StreamClosed:
                pass
            self._run_close_callbacks()

    def transport_closed(self) -> None:
        if self._mark_closed():
            self._run_close_callbacks()

    def _run_close_callbacks(self) -> None:
        for callback in self._on_close:
            try:
                callback()
            except Exception:  # noqa: BLE001 - cleanup must not take the reader thread down
                self.conn.peer.record_error(f"close callback of {self.service!r}:\n{traceback.format_exc()}")


class Connection:
    def __init__(self, peer: AdbPeer, sock: socket.socket, address: tuple):
        self.peer = peer
        self.sock = sock
        self.address = address
        self.version = wire.A_VERSION_MIN
        self.max_payload = wire.MAX_PAYLOAD
        self.delayed_ack = False
        self.online = False
        self.host_banner = ""
        self.auth_key: str | None = None
        self.prompt_pending = False
        self.pending_key: str | None = None
        self.closed = threading.Event()
        self._token = b""
        self._send_lock = threading.Lock()
        self._streams_lock = threading.Lock()
        self._streams: dict[int, Stream] = {}
        self._next_id = 1

    # -- I/O -----------------------------------------------------------------
    def _recv_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise ConnectionError("host closed the connection")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        packet = wire.Message(command, arg0, arg1, data).pack(self.version < wire.A_VERSION_SKIP_CHECKSUM)
        with self._send_lock:
            if self.closed.is_set():
                raise StreamClosed("connection closed")
            try:
                self.sock.sendall(packet)
            except OSError as exc:
                self.abort()
                raise StreamClosed(f"send failed: {exc}") from None

    def serve(self) -> None:
        try:
            while not self.closed.is_set():
                header = self._recv_exact(wire.HEADER.size)
                command, arg0, arg1, length, check = wire.parse_header(header, self.max_payload)
                data = self._recv_exact(length) if length else b""
                if self.version < wire.A_VERSION_SKIP_CHECKSUM and command != A_CNXN \
                        and check != wire.checksum(data):
                    # adbd: "bad checksum", and the transport is dropped
                    raise ProtocolError(f"{wire.command_name(command)} checksum 0x{check:08x} is wrong")
                self.handle(command, arg0, arg1, data)
        except (ConnectionError, OSError, StreamClosed):
            pass
        except ProtocolError as exc:
            self.peer.event("protocol_error", str(exc))
        except Exception:  # noqa: BLE001
            self.peer.record_error(f"connection reader:\n{traceback.format_exc()}")
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the TCP connection; every stream ends as adbd's do when a transport goes."""
        if self.closed.is_set():
            return
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._streams_lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.transport_closed()
        self.peer.connection_closed(self)

    # -- streams table ---------------------------------------------------------
    def forget(self, stream: Stream) -> None:
        with self._streams_lock:
            if self._streams.get(stream.local_id) is stream:
                del self._streams[stream.local_id]

    def close_arg0(self, stream: Stream) -> int:
        """arg0 of the CLSE ending ``stream``: our id, or 0 on a daemon with the legacy close."""
        return 0 if self.peer.personality.legacy_close else stream.local_id

    def ack_payload(self, stream: Stream, consumed: int) -> bytes:
        """The payload of an OKAY: the bytes consumed under delayed_ack, nothing otherwise."""
        return b"" if stream.window is None else struct.pack("<i", consumed)

    def _new_stream(self, remote_id: int, service: str, window: int | None = None) -> Stream:
        with self._streams_lock:
            local_id = self._next_id
            self._next_id = self._next_id + 1 if self._next_id < 0xFFFFFFFF else 1
            stream = Stream(self, local_id, remote_id, service, window)
            self._streams[local_id] = stream
        return stream

    def _stream(self, local_id: int) -> Stream | None:
        with self._streams_lock:
            return self._streams.get(local_id)

    def close_all_streams(self) -> None:
        with self._streams_lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.transport_closed()

    # -- packets -------------------------------------------------------------
    def handle(self, command: int, arg0: int, arg1: int, data: bytes) -> None:
        if command == A_CNXN:
            self._handle_cnxn(arg0, arg1, data)
        elif command == A_AUTH:
            self._handle_auth(arg0, data)
        elif command == A_OPEN:
            if not self.online or arg0 == 0:
                return
            service = data.rstrip(b"\0").decode("utf-8", "replace")
            if self.delayed_ack != bool(arg1):
                # adbd: "unexpected value of A_OPEN arg1" (a window without delayed acks, or none with them)
                self.peer.event("refused", f"{service} (OPEN arg1={arg1}, delayed_ack={self.delayed_ack})")
                self._send_quiet(A_CLSE, 0, arg0)
                return
            threading.Thread(target=self._open, args=(arg0, service, arg1 or None), daemon=True,
                             name=f"adbpeer-open-{service[:24]}").start()
        elif command == A_OKAY:
            if not self.online or arg0 == 0 or arg1 == 0:
                return
            if len(data) not in (0, 4):
                self.peer.event("protocol_error", f"OKAY payload of {len(data)} bytes")
                return
            stream = self._stream(arg1)
            if stream is not None and stream.remote_id == arg0:
                stream.okay(struct.unpack("<i", data)[0] if data else None)
            elif stream is None:
                self.send(A_CLSE, arg1, arg0)
        elif command == A_WRTE:
            if not self.online or arg0 == 0 or arg1 == 0:
                return
            stream = self._stream(arg1)
            if stream is not None and stream.remote_id == arg0:
                stream.deliver(data)
        elif command == A_CLSE:
            if not self.online or arg1 == 0:
                return
            stream = self._stream(arg1)
            if stream is not None and (arg0 == 0 or stream.remote_id == arg0):
                stream.host_closed()
        elif command in (A_STLS, A_SYNC):
            # A host only answers STLS when the device asked for TLS, which this peer never does.
            raise ProtocolError(f"unexpected {wire.command_name(command)} from the host")

    def _handle_cnxn(self, version: int, max_payload: int, banner: bytes) -> None:
        self.close_all_streams()
        self.online = False
        self.version = min(version, self.peer.personality.version)
        self.max_payload = max(256, min(max_payload, self.peer.faults.max_payload))
        self.host_banner = banner.rstrip(b"\0").decode("utf-8", "replace")
        self.delayed_ack = "delayed_ack" in self.peer.features and "delayed_ack" in host_features(banner)
        self.peer.event("cnxn", f"version=0x{version:08x} maxdata={max_payload} banner={self.host_banner!r}")
        if not self.peer.auth_required:
            self._go_online("auth disabled")
        else:
            self._send_token()

    def _send_token(self) -> None:
        self._token = os.urandom(wire.TOKEN_SIZE)
        self.send(A_AUTH, AUTH_TOKEN, 0, self._token)

    def _handle_auth(self, kind: int, data: bytes) -> None:
        if self.online:
            return
        if kind == AUTH_SIGNATURE:
            key_line = None if self.peer.faults.reject_keys else self.peer.find_signing_key(self._token, data)
            if key_line is not None:
                self.auth_key = key_line
                self._go_online("signature")
            else:
                self.peer.event("auth", "signature rejected")
                self._send_token()
        elif kind == AUTH_RSAPUBLICKEY:
            key_line = data.split(b"\0", 1)[0].decode("ascii", "replace").strip()
            try:
                keys.decode_android_pubkey(key_line)
            except keys.KeyFormatError as exc:
                self.peer.event("auth", f"unparseable public key: {exc}")
                return
            if self.peer.auto_accept and not self.peer.faults.reject_keys:
                self.peer.authorize(key_line)
                self.auth_key = key_line
                self._go_online("public key accepted (auto_accept)")
            else:
                # The phone now shows "Allow USB debugging?" and answers nothing until the user taps.
                self.prompt_pending = True
                self.pending_key = key_line
                self.peer.event("auth", "prompt pending for " + key_line.split()[0][:16] + "...")
        else:
            raise ProtocolError(f"AUTH type {kind} from the host")

    def allow_pending(self) -> bool:
        """The user taps "Allow" on this connection's prompt: trust the key and come online."""
        if not self.prompt_pending or self.pending_key is None or self.closed.is_set():
            return False
        self.peer.authorize(self.pending_key)
        self.auth_key = self.pending_key
        try:
            self._go_online("user allowed the prompt")
        except StreamClosed:
            return False
        return True

    def _go_online(self, why: str) -> None:
        self.online = True
        self.prompt_pending = False
        self.peer.event("online", why)
        self.send(A_CNXN, self.peer.personality.version, self.max_payload, self.peer.banner().encode())

    # -- services ------------------------------------------------------------
    def _open(self, remote_id: int, service: str, window: int | None = None) -> None:
        peer = self.peer
        peer.service_opened(service)
        faults = peer.faults
        for prefix, seconds in list(faults.stall.items()):
            if service.startswith(prefix):
                peer.event("stall", f"{service} for {seconds}s")
                if self.closed.wait(seconds):
                    return
        if any(service.startswith(prefix) for prefix in list(faults.refuse)):
            peer.event("refused", service)
            self._send_quiet(A_CLSE, 0, remote_id)
            return
        handler = peer.resolve_service(service)
        if handler is None:
            peer.event("unknown_service", service)
            self._send_quiet(A_CLSE, 0, remote_id)
            return
        if not self.online or self.closed.is_set():
            return
        stream = self._new_stream(remote_id, service, window)
        try:
            self.send(A_OKAY, stream.local_id, remote_id,
                      b"" if window is None else struct.pack("<i", wire.INITIAL_DELAYED_ACK_BYTES))
            handler(stream)
        except StreamClosed:
            pass
        except Exception:  # noqa: BLE001
            peer.record_error(f"service {service!r}:\n{traceback.format_exc()}")
        finally:
            stream.close()

    def _send_quiet(self, command: int, arg0: int, arg1: int) -> None:
        try:
            self.send(command, arg0, arg1)
        except StreamClosed:
            pass



def host_features(banner: bytes) -> set[str]:
    """The features of a CNXN banner, split as adbd's parse_banner does it: ``host::key=value;...``,
    with the banner's bytes as sent (a trailing NUL stays part of the last feature, as on adbd)."""
    text = banner.decode("utf-8", "replace")
    pieces = text.split(":")
    if len(pieces) < 3:
        return set()
    for prop in pieces[2].split(";"):
        key_value = prop.split("=")
        if len(key_value) == 2 and key_value[0] == "features":
            return set(key_value[1].split(","))
    return set()

"""The device services: ``shell[,args]:CMD``, ``exec:CMD`` and ``sync:``.

Behaviour follows AOSP adbd (``daemon/services.cpp``, ``shell_service.cpp``,
``file_sync_service.cpp``):

* ``shell,v2[,raw|,pty][,TERM=x]:CMD`` speaks the shell protocol: packets of
  ``id (1 byte) + length (uint32 LE) + data``; ids 0 stdin, 1 stdout, 2 stderr,
  3 exit (1 byte), 4 close-stdin, 5 window-size ("RxC,XxY").  Raw mode keeps
  stderr apart; pty mode merges it.  The exit code is the child's status, or
  ``0x80 | signal`` when a signal killed it (137 for SIGKILL).
* Without ``v2`` (``shell:CMD``, ``exec:CMD``) the child runs on a pty put in
  raw mode: stdout and stderr merged, no exit code, the stream just closes.
* ``shell:`` with no command starts an interactive shell on a pty (a plain
  ``sh``, not a login shell as on Android, so /etc/profile keeps its hands
  off PATH).
* When the host closes the stream the child gets SIGHUP, as from adbd.
* A daemon whose features lack ``shell_v2`` knows only ``shell:CMD``; one
  without ``exec:`` (peer.Personality) refuses it: both end with CLSE.
* ``sync:`` is the v1 file protocol (STAT=lstat, LIST, SEND, RECV, QUIT);
  paths outside the peer's sandbox are refused as a phone refuses paths the
  shell user cannot write ("Permission denied").

Children run ``/bin/sh -c CMD`` on the host, in their own session, with the
peer's environment (fixture ``bin/`` first on PATH, the exec shim preloaded).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import termios
import threading
import tty
from typing import TYPE_CHECKING, Callable

from .connection import Stream, StreamClosed

if TYPE_CHECKING:
    from .peer import AdbPeer

# shell protocol ids
ID_STDIN, ID_STDOUT, ID_STDERR, ID_EXIT, ID_CLOSE_STDIN, ID_WINDOW_SIZE = range(6)
SHELL_HEADER = struct.Struct("<BI")

# sync protocol
SYNC_DATA_MAX = 64 * 1024
SYNC_HEADER = struct.Struct("<4sI")
STAT_V1 = struct.Struct("<4sIII")
DENT_V1 = struct.Struct("<4sIIII")


def resolve(peer: AdbPeer, service: str) -> Callable[[Stream], None] | None:
    """The handler for a service name, or None (adbd closes the stream at once)."""
    if service.startswith("shell"):
        rest = service[len("shell"):]
        if ":" not in rest:
            return None
        args, command = rest.split(":", 1)
        if args and "shell_v2" not in peer.features:
            return None        # a daemon before shell v2 knows "shell:" only
        use_pty = not command
        protocol = False
        term = "dumb"
        for arg in args.split(","):
            if arg == "raw":
                use_pty = False
            elif arg == "pty":
                use_pty = True
            elif arg == "v2":
                protocol = True
            elif arg.startswith("TERM="):
                term = arg[len("TERM="):]
        return lambda stream: run_subprocess(peer, stream, command, use_pty=use_pty, protocol=protocol, term=term)
    if service.startswith("exec:") and peer.personality.exec_service:
        command = service[len("exec:"):]
        return lambda stream: run_subprocess(peer, stream, command, use_pty=False, protocol=False, term=None)
    if service.startswith("sync:"):
        return lambda stream: SyncService(peer, stream).run()
    return None


# ---------------------------------------------------------------------------
# shell / exec


def _shell_packet(packet_id: int, data: bytes) -> bytes:
    return SHELL_HEADER.pack(packet_id, len(data)) + data


def _exit_code(returncode: int) -> int:
    return (0x80 | -returncode) if returncode < 0 else returncode & 0xFF


def run_subprocess(peer: AdbPeer, stream: Stream, command: str, *, use_pty: bool, protocol: bool,
                   term: str | None) -> None:
    if not protocol and not use_pty:
        # adbd: "Can't create raw subprocess without shell protocol, using PTY in raw mode instead".
        use_pty, make_raw = True, True
    else:
        make_raw = False
    env = peer.shell_environment(term)
    # adbd starts a login shell for an empty command; a login dash would read /etc/profile, which
    # replaces PATH (and so the fixture tools), so this peer starts a plain sh (interactive on a pty).
    argv = ["/bin/sh"] if not command else ["/bin/sh", "-c", command]
    master = slave = None
    io_sock = err_sock = child_io = child_err = None
    try:
        if use_pty:
            master, slave = os.openpty()
            if make_raw:
                tty.setraw(slave)
            stdio = (slave, slave, slave)
        else:
            io_sock, child_io = socket.socketpair()
            err_sock, child_err = socket.socketpair()
            stdio = (child_io.fileno(), child_io.fileno(), child_err.fileno())
        try:
            proc = subprocess.Popen(argv, executable="/bin/sh", stdin=stdio[0], stdout=stdio[1], stderr=stdio[2],
                                    cwd=peer.sandbox, env=env, start_new_session=True, close_fds=True)
        except OSError as exc:
            message = f"error: exec '/bin/sh' failed: {exc.strerror}\n".encode()
            if protocol:
                stream.write(_shell_packet(ID_STDERR, message) + _shell_packet(ID_EXIT, bytes([126])))
            else:
                stream.write(message)
            return
        peer.process_started(proc, command)
    finally:
        for fd in (slave,):
            if fd is not None:
                os.close(fd)
        for sock in (child_io, child_err):
            if sock is not None:
                sock.close()

    io_fd = master if use_pty else io_sock.fileno()
    out_fds = {io_fd: ID_STDOUT}
    if err_sock is not None:
        out_fds[err_sock.fileno()] = ID_STDERR
    hung_up = threading.Event()

    def hang_up() -> None:
        # The host went away: SIGHUP to the child, and stop feeding it.
        hung_up.set()
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    stream.on_close(hang_up)
    stdin_thread = threading.Thread(target=_pump_stdin, args=(stream, io_fd, io_sock, use_pty, protocol),
                                    daemon=True, name=f"adbpeer-stdin-{proc.pid}")
    stdin_thread.start()
    chunk = max(256, min(stream.conn.max_payload, SYNC_DATA_MAX) - SHELL_HEADER.size)
    try:
        _pump_output(stream, out_fds, chunk, protocol, hung_up)
        returncode = proc.wait()
        peer.process_finished(proc)
        if protocol and not stream.closed:
            stream.write(_shell_packet(ID_EXIT, bytes([_exit_code(returncode)])))
    finally:
        # Stop the stdin pump before its fd number can be closed and reused.
        stream.close()
        stdin_thread.join(timeout=5)
        if master is not None:
            os.close(master)
        for sock in (io_sock, err_sock):
            if sock is not None:
                sock.close()


def _pump_output(stream: Stream, out_fds: dict[int, int], chunk: int, protocol: bool,
                 hung_up: threading.Event) -> None:
    """Child output -> host, until every output fd reaches EOF (or the host hangs up)."""
    open_fds = dict(out_fds)
    while open_fds and not hung_up.is_set():
        readable, _, _ = select.select(list(open_fds), [], [], 0.2)
        for fd in readable:
            try:
                data = os.read(fd, chunk)
            except OSError as exc:
                if exc.errno not in (errno.EIO, errno.EBADF, errno.ECONNRESET):
                    raise
                data = b""
            if not data:
                del open_fds[fd]
                continue
            try:
                stream.write(_shell_packet(open_fds[fd], data) if protocol else data)
            except StreamClosed:
                return


def _pump_stdin(stream: Stream, io_fd: int, io_sock: socket.socket | None, use_pty: bool, protocol: bool) -> None:
    """Host data -> child stdin (raw bytes, or shell-protocol packets)."""
    buffer = bytearray()
    stdin_open = True
    while True:
        data = stream.read()
        if not data:
            return
        if not protocol:
            if stdin_open:
                stdin_open = _write_all(io_fd, data)
            continue
        buffer += data
        while len(buffer) >= SHELL_HEADER.size:
            packet_id, length = SHELL_HEADER.unpack_from(buffer)
            if len(buffer) < SHELL_HEADER.size + length:
                break
            payload = bytes(buffer[SHELL_HEADER.size:SHELL_HEADER.size + length])
            del buffer[:SHELL_HEADER.size + length]
            if packet_id == ID_STDIN and stdin_open:
                stdin_open = _write_all(io_fd, payload)
            elif packet_id == ID_CLOSE_STDIN and not use_pty and io_sock is not None and stdin_open:
                try:
                    io_sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                stdin_open = False
            elif packet_id == ID_WINDOW_SIZE and use_pty:
                _set_window_size(io_fd, payload)


def _write_all(fd: int, data: bytes) -> bool:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except OSError:
            return False
        view = view[written:]
    return True


def _set_window_size(fd: int, payload: bytes) -> None:
    try:
        size, pixels = payload.rstrip(b"\0").decode().split(",")
        rows, cols = (int(v) for v in size.split("x"))
        xpix, ypix = (int(v) for v in pixels.split("x"))
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, xpix, ypix))
    except (ValueError, OSError):
        pass


# ---------------------------------------------------------------------------
# sync


class _SyncFailed(Exception):
    """The request failed and the service ends (adbd returns false from the handler)."""


class SyncService:
    def __init__(self, peer: AdbPeer, stream: Stream):
        self.peer = peer
        self.stream = stream
        self._buffer = bytearray()
        self._pos = 0                  # where the next read starts in _buffer
        self._eof = False
        self._out = bytearray()

    # -- replies: coalesced into WRTEs of up to the max payload, as adbd's socket reads them --
    def _emit(self, data: bytes) -> None:
        self._out += data
        step = self.stream.conn.max_payload
        if len(self._out) >= step:
            whole = len(self._out) - len(self._out) % step
            chunk = bytes(self._out[:whole])
            del self._out[:whole]
            self.stream.write(chunk)

    def _flush(self) -> None:
        if self._out:
            chunk = bytes(self._out)
            self._out.clear()
            self.stream.write(chunk)

    # -- byte-stream reading over WRTE payloads ---------------------------------
    def _read_exact(self, n: int) -> bytes | None:
        # a read position instead of deleting from the front: a 1 MiB WRTE holds 16 DATA messages,
        # and moving the rest of the buffer after each would cost the peer more than the copy itself
        if len(self._buffer) - self._pos < n:
            self._flush()
            del self._buffer[:self._pos]
            self._pos = 0
        while len(self._buffer) < n:
            if self._eof:
                return None
            data = self.stream.read()
            if not data:
                self._eof = True
                return None
            self._buffer += data
        out = bytes(self._buffer[self._pos:self._pos + n])
        self._pos += n
        return out

    def _fail(self, reason: str) -> None:
        encoded = reason.encode()
        self._emit(SYNC_HEADER.pack(b"FAIL", len(encoded)) + encoded)
        self._flush()

    def run(self) -> None:
        try:
            while self._handle_one():
                pass
        except _SyncFailed:
            pass
        finally:
            if not self.stream.closed:
                self._flush()

    def _handle_one(self) -> bool:
        header = self._read_exact(SYNC_HEADER.size)
        if header is None:
            return False
        request, length = SYNC_HEADER.unpack(header)
        if length > 1024:
            self._fail("path too long")
            return False
        raw_path = self._read_exact(length)
        if raw_path is None:
            return False
        path = raw_path.decode("utf-8", "surrogateescape")
        self.peer.event("sync", f"{request.decode('ascii', 'replace')} {path}")
        if request == b"STAT":
            self._stat(path)
        elif request == b"LIST":
            self._list(path)
        elif request == b"SEND":
            return self._send(path)
        elif request == b"RECV":
            return self._recv(path)
        elif request == b"QUIT":
            return False
        else:
            self._fail("unknown command %08x" % struct.unpack("<I", request)[0])
            return False
        return True

    # -- requests ------------------------------------------------------------
    def _stat(self, path: str) -> None:
        mode = size = mtime = 0
        if self.peer.inside_sandbox(path):
            try:
                st = os.lstat(path)
                mode, size, mtime = st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime) & 0xFFFFFFFF
            except OSError:
                pass
        self._emit(STAT_V1.pack(b"STAT", mode, size, mtime))

    def _list(self, path: str) -> None:
        out = bytearray()
        if self.peer.inside_sandbox(path) and os.path.isdir(path):
            try:
                names = [".", ".."] + os.listdir(path)
            except OSError:
                names = []
            for name in names:
                try:
                    st = os.lstat(os.path.join(path, name))
                except OSError:
                    continue
                encoded = name.encode("utf-8", "surrogateescape")
                out += DENT_V1.pack(b"DENT", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime) & 0xFFFFFFFF,
                                    len(encoded)) + encoded
                if len(out) >= SYNC_DATA_MAX:
                    self._emit(bytes(out))
                    out.clear()
        out += DENT_V1.pack(b"DONE", 0, 0, 0, 0)
        self._emit(bytes(out))

    def _recv(self, path: str) -> bool:
        if not self.peer.inside_sandbox(path):
            self._fail("open failed: Permission denied")
            return False
        try:
            fh = open(path, "rb")
        except OSError as exc:
            self._fail(f"open failed: {exc.strerror}")
            return False
        with fh:
            while True:
                try:
                    data = fh.read(SYNC_DATA_MAX - SYNC_HEADER.size)
                except OSError as exc:
                    self._fail(f"read failed: {exc.strerror}")
                    return False
                if not data:
                    break
                self._emit(SYNC_HEADER.pack(b"DATA", len(data)) + data)
        self._emit(SYNC_HEADER.pack(b"DONE", 0))
        return True

    def _send(self, spec: str) -> bool:
        if "," not in spec:
            self._fail("missing , in ID_SEND_V1")
            return False
        path, mode_text = spec.rsplit(",", 1)
        try:
            mode = int(mode_text, 0)
        except ValueError:
            self._fail("bad mode")
            return False
        if not self.peer.inside_sandbox(path):
            self.peer.event("sync_refused", path)
            self._fail("couldn't create file: Permission denied")
            self._drain()
            return False
        try:
            st = os.lstat(path)
            do_unlink = stat.S_ISREG(st.st_mode) or (stat.S_ISLNK(st.st_mode) and not stat.S_ISLNK(mode))
        except OSError:
            do_unlink = True
        if do_unlink:
            try:
                os.unlink(path)
            except OSError:
                pass
        if stat.S_ISLNK(mode):
            return self._send_link(path)
        mode &= 0o777
        mode |= (mode >> 3) & 0o070
        mode |= (mode >> 3) & 0o007
        return self._send_file(path, mode, do_unlink)

    def _open_for_send(self, path: str, mode: int) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            return os.open(path, flags, mode)
        except FileNotFoundError:
            try:
                os.makedirs(os.path.dirname(path), mode=0o775, exist_ok=True)
            except OSError as exc:
                raise _OpenFailed(f"secure_mkdirs failed: {exc.strerror}") from None
            return self._open_for_send(path, mode)
        except FileExistsError:
            try:
                return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise _OpenFailed(f"couldn't create file: {exc.strerror}") from None
        except OSError as exc:
            raise _OpenFailed(f"couldn't create file: {exc.strerror}") from None

    def _send_file(self, path: str, mode: int, do_unlink: bool) -> bool:
        try:
            fd = self._open_for_send(path, mode)
        except _OpenFailed as exc:
            self._fail(str(exc))
            self._drain()
            return False
        faults = self.peer.faults
        drop_after = self.peer.take_send_drop()
        disk_free = faults.disk_free
        written = 0
        try:
            os.fchmod(fd, mode)
            while True:
                header = self._read_exact(SYNC_HEADER.size)
                if header is None:
                    # The host went away mid-file: adbd's fail path removes what it wrote.
                    self._unlink_if(do_unlink, path)
                    raise _SyncFailed("EOF in SEND")
                kind, size = SYNC_HEADER.unpack(header)
                if kind == b"DONE":
                    mtime = size
                    break
                if kind != b"DATA":
                    self._fail("invalid data message")
                    raise _SyncFailed("bad id")
                if size > SYNC_DATA_MAX:
                    self._fail("oversize data message")
                    raise _SyncFailed("oversize")
                data = self._read_exact(size)
                if data is None:
                    self._unlink_if(do_unlink, path)
                    raise _SyncFailed("EOF in DATA")
                if drop_after is not None and written + len(data) > drop_after:
                    os.write(fd, data[:drop_after - written])
                    os.fsync(fd)
                    self.peer.event("drop", f"connection cut after {drop_after} bytes of SEND {path}")
                    self.stream.conn.abort()
                    raise _SyncFailed("dropped")
                if disk_free is not None and written + len(data) > disk_free:
                    os.write(fd, data[:max(0, disk_free - written)])
                    self.peer.event("no_space", path)
                    self._fail("write failed: No space left on device")
                    self._drain()
                    self._unlink_if(do_unlink, path)
                    raise _SyncFailed("no space")
                if not _write_all(fd, data):
                    self._fail("write failed: I/O error")
                    raise _SyncFailed("write")
                written += len(data)
        finally:
            os.close(fd)
        os.utime(path, (mtime, mtime), follow_symlinks=False)
        self._emit(SYNC_HEADER.pack(b"OKAY", 0))
        return True

    def _send_link(self, path: str) -> bool:
        header = self._read_exact(SYNC_HEADER.size)
        if header is None:
            return False
        kind, size = SYNC_HEADER.unpack(header)
        if kind != b"DATA":
            self._fail("invalid data message: expected ID_DATA")
            return False
        if size > SYNC_DATA_MAX:
            self._fail("oversize data message")
            return False
        target = self._read_exact(size)
        if target is None:
            return False
        target_text = target.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        try:
            if os.path.islink(path) and os.readlink(path) == target_text:
                pass
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass
                try:
                    os.symlink(target_text, path)
                except FileNotFoundError:
                    os.makedirs(os.path.dirname(path), mode=0o775, exist_ok=True)
                    os.symlink(target_text, path)
        except OSError as exc:
            self._fail(f"symlink failed: {exc.strerror}")
            return False
        header = self._read_exact(SYNC_HEADER.size)
        if header is None:
            return False
        kind, mtime = SYNC_HEADER.unpack(header)
        if kind != b"DONE":
            self._fail("invalid data message: expected ID_DONE")
            return False
        try:
            os.utime(path, (mtime, mtime), follow_symlinks=False)
        except OSError:
            pass
        self._emit(SYNC_HEADER.pack(b"OKAY", 0))
        return True

    @staticmethod
    def _unlink_if(do_unlink: bool, path: str) -> None:
        if do_unlink:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _drain(self) -> None:
        """After a FAIL, swallow DATA until DONE, as adbd does for old clients."""
        while True:
            header = self._read_exact(SYNC_HEADER.size)
            if header is None:
                return
            kind, size = SYNC_HEADER.unpack(header)
            if kind != b"DATA" or size > SYNC_DATA_MAX:
                return
            if self._read_exact(size) is None:
                return


class _OpenFailed(Exception):
    pass

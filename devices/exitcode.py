"""Exit codes over a shell that reports none (adb shell protocol v1).

The v1 shell service merges stderr into stdout and sends no exit status, and
old daemons run it on a pty that turns every ``\\n`` into ``\\r\\n``.  We run
the command in a child ``sh`` and print a marker that is unique to the call,
followed by ``$?``::

    sh -c '<command>'; printf '\\n<marker>%d\\n' "$?"

then take the *last* occurrence of the marker in the output.  The marker is
random per call, so output of the command cannot forge an exit code by
accident, and its own line tells whether the daemon translated newlines.
"""

from __future__ import annotations

import re
import secrets

from edgequant.devices.transport import DeviceError, ShellResult, quote


def new_marker() -> str:
    return "EQX" + secrets.token_hex(8) + ":"


def wrap(command: str, marker: str) -> str:
    """``command`` run by a child shell, then the marker and its exit code on a line of their own."""
    return f"sh -c {quote(command)}; printf '\\n{marker}%d\\n' \"$?\""


def unwrap(output: bytes, marker: str, *, where: str) -> ShellResult:
    """The command's output and exit code from the raw output of :func:`wrap`.

    Raises ``DeviceError("io")`` when the marker line is missing (the shell
    was killed, or the connection ended early)."""
    tag = marker.encode("ascii")
    at = output.rfind(tag)
    if at < 0:
        raise DeviceError("io", f"{where}: the shell ended without reporting an exit status "
                                f"(killed, or the connection dropped); retry")
    m = re.match(rb"(\d{1,3})(\r?\n)?", output[at + len(tag):])
    if m is None:
        raise DeviceError("io", f"{where}: unreadable exit status from the device shell; retry")
    code = int(m.group(1))
    body = output[:at]
    # the newline printed before the marker is ours; a pty (seen on the marker's own line
    # end) turns every \n into \r\n, ours included
    pty = m.group(2) == b"\r\n"
    ours = b"\r\n" if pty else b"\n"
    if body.endswith(ours):
        body = body[:-len(ours)]
    if pty:
        body = body.replace(b"\r\n", b"\n")
    return ShellResult(code, body.decode("utf-8", errors="replace"))

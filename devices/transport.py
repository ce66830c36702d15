"""The one small interface every device transport implements.

Two implementations live beside it: ``direct`` (adb-shell, talking to a
phone's adbd over TCP or USB with no adb server) and ``server`` (the host adb
server through adbutils).  Everything above this layer (device facts, pushes,
the on-device runner) speaks only this interface, so it runs unchanged over
either transport.

Paths on the device are POSIX strings; anything interpolated into a shell
command must go through :func:`quote` (``shlex.quote``): model names and
folders come from users.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from edgequant.core.errors import RunFailed

# Called with (bytes done, bytes total) while a file moves.
ProgressFn = Callable[[int, int], None]


class DeviceError(RunFailed):
    """A device-side failure: ``kind`` says which (``unauthorized``, ``offline``,
    ``timeout``, ``refused``, ``no_space``, ``io``), the message says what to do."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ShellResult:
    exit_code: int
    stdout: str
    stderr: str = ""          # empty where the transport merges stderr into stdout (shell v1)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Transport(Protocol):
    serial: str               # "host:port" for TCP devices, the USB serial otherwise
    kind: str                 # "direct" | "server"

    def shell(self, command: str, timeout: float) -> ShellResult:
        """Run ``command`` with the device's ``sh``; the real exit code, stdout and stderr.

        On timeout the remote command is killed and ``DeviceError("timeout")`` raised."""

    def push(self, local: Path, remote: str, on_progress: ProgressFn | None = None,
             timeout: float | None = None) -> None:
        """Copy a host file to ``remote`` (mode 0755 for executables, 0644 otherwise)."""

    def pull(self, remote: str, local: Path, timeout: float | None = None) -> None:
        """Copy a device file to ``local`` (written under a temporary name, then renamed)."""

    def close(self) -> None:
        ...


def quote(value: str | Path) -> str:
    """One shell word, safe to send to the device's shell."""
    return shlex.quote(str(value))

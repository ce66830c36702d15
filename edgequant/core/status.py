"""How a rung ended (``RungStatus``) and the one reading of a process's exit code as such a status.

Ground code: imports nothing of edgequant's.  The statuses are stored as their plain strings
(``"ok"``, ``"oom"``, ...): a ``RungStatus`` *is* a ``str``, so rows and comparisons are unchanged.
"""

from __future__ import annotations

import signal
from enum import StrEnum


class RungStatus(StrEnum):
    OK = "ok"              # measured
    FAILED = "failed"      # the program reported an error or exited non-zero
    CRASHED = "crashed"    # killed by a signal other than SIGKILL (SIGSEGV, SIGILL, SIGABRT, ...)
    OOM = "oom"            # killed by SIGKILL: what the kernel's OOM killer and Android's lmkd send
    TIMEOUT = "timeout"    # stopped at its deadline
    SKIPPED = "skipped"    # not attempted (no room on the device, a place that cannot run it)


FAILURES = (RungStatus.FAILED, RungStatus.CRASHED, RungStatus.OOM, RungStatus.TIMEOUT)
def exit_signal(code: int, *, shell: bool = False) -> int | None:
    """The signal that ended a process, from its exit code: Python's ``-N`` (``Popen.returncode``), or, with
    ``shell=True``, a POSIX shell's ``128 + N`` (``$?`` of a killed program, as a device reports it)."""
    if code < 0:
        return -code
    if shell and code > 128:
        return code - 128
    return None


def classify_exit(code: int, *, timed_out: bool = False, shell: bool = False) -> RungStatus:
    """How a process ended: stopped at its deadline -> ``timeout``; killed by SIGKILL -> ``oom``; by another
    signal -> ``crashed``; a non-zero exit -> ``failed``; else ``ok``."""
    if timed_out:
        return RungStatus.TIMEOUT
    sig = exit_signal(code, shell=shell)
    if sig == signal.SIGKILL:
        return RungStatus.OOM
    if sig is not None:
        return RungStatus.CRASHED
    return RungStatus.FAILED if code != 0 else RungStatus.OK


def signal_name(sig: int) -> str:
    """``SIGSEGV`` for 11; ``signal 99`` for a number this system does not name."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"

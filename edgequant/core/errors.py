"""The one exception type the CLI turns into a clean one-line error."""

import re
import unicodedata

from edgequant.core.status import FAILURES


class EdgequantError(Exception):
    """A user-facing failure: the message names the thing and what to do.

    ``exit_code`` follows the CLI convention: 2 for bad input, 1 for a
    failure while doing the work, 130 for an interrupt.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class BadInput(EdgequantError):
    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


class RunFailed(EdgequantError):
    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


BENCH_STATUSES = tuple(str(s) for s in FAILURES)   # failed, crashed, oom, timeout


class BenchError(RunFailed):
    """A measurement that did not produce a result; ``status`` (a failure status) says how it ended.  Raised by
    the host bench, the measured command on a phone and the eval alike."""

    def __init__(self, status: str, message: str):
        if status not in BENCH_STATUSES:
            raise ValueError(f"unknown bench status {status!r}; allowed: {', '.join(BENCH_STATUSES)}")
        super().__init__(" ".join(message.split()))  # always one line
        self.status = status


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` made safe to quote in a one-line error: every run of whitespace (newlines
    included) becomes one space, any other control character becomes ``?``, and past
    ``limit`` characters it is cut with ``…``.  For command excerpts, device messages and
    file names, which come from users and devices."""
    flat = re.sub(r"\s+", " ", str(text)).strip()
    flat = "".join("?" if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in flat)
    if limit is not None and len(flat) > limit:
        flat = flat[:max(1, limit - 1)].rstrip() + "…"
    return flat
class Terminated(KeyboardInterrupt):
    """SIGTERM, turned by the CLI into an interrupt so that it unwinds like Ctrl-C (exit 143)."""

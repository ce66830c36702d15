"""Child processes that do not outlive edgequant.

A worker or converter left running after its parent was killed (SIGKILL, an OOM kill, a closed terminal)
keeps burning CPU beside the next run and keeps writing its partial file.  Every long-lived child is
started with :func:`die_with_parent` as its ``preexec_fn``: Linux's parent-death signal
(``prctl(PR_SET_PDEATHSIG, SIGKILL)``) kills it when the thread that started it ends.  Children that
should not see a terminal's Ctrl-C also get their own session (``start_new_session=True``); the parent
then stops them itself.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1          # <linux/prctl.h>

_prctl = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl   # resolved here: the child only calls it
    except (OSError, AttributeError):
        _prctl = None


def die_with_parent():
    """A ``preexec_fn`` for ``subprocess``: the child is SIGKILLed when this process dies (it exits at once
    if this process is already gone).  The signal follows the *thread* that starts the child: start
    long-lived children from a thread that lives as long as the command."""
    parent = os.getpid()

    def arm() -> None:
        if _prctl is None:
            return
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:       # the parent died before the signal was armed
            os._exit(1)

    return arm

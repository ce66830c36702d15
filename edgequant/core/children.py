"""Child processes that do not outlive edgequant.

A worker or converter left running after its parent was killed (SIGKILL, an OOM kill, a closed terminal)
keeps burning CPU beside the next run and keeps writing its partial file.  Every long-lived child is
started with :func:`die_with_parent` as its ``preexec_fn``: Linux's parent-death signal
(``prctl(PR_SET_PDEATHSIG, SIGKILL)``) kills it when the thread that started it ends.  Children that
should not see a terminal's Ctrl-C also get their own session (``start_new_session=True``); the parent
then stops them itself.

A SIGTERM or a Ctrl-C can arrive while this process forks.  Python runs a signal's handler at the next
bytecode, and if that is inside an at-fork hook (``logging`` registers some, and ``gguf`` imports logging)
the exception the handler raises is printed as "ignored" there, traceback and all, and lost: the command
would go on to the end and exit 0, its run stored as complete.  The CLI's handlers therefore also record the
signal (:func:`note_terminated`), and every place that forks calls :func:`raise_if_terminated` right after;
in a forked child (before it execs) they do nothing.  The eval and bench workers are started with no
``preexec_fn`` at all (no Python code runs around their fork) and arm the parent-death signal themselves
(``bench.worker.serve``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from edgequant.core.errors import Terminated

PR_SET_PDEATHSIG = 1          # <linux/prctl.h>

_stopped: list[type[KeyboardInterrupt] | None] = [None]   # what the CLI's signal handlers raised (Ctrl-C's
#                                                          KeyboardInterrupt, SIGTERM's Terminated); never
#                                                          cleared: the command is ending

_prctl = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl   # resolved here: the child only calls it
    except (OSError, AttributeError):
        _prctl = None


def die_with_parent(parent: int | None = None):
    """A ``preexec_fn`` for ``subprocess``: the child is SIGKILLed when this process dies (it exits at once
    if this process is already gone).  The signal follows the *thread* that starts the child: start
    long-lived children from a thread that lives as long as the command.  Called in a process with its
    parent's pid (``parent``), the function it returns arms that process itself."""
    parent = os.getpid() if parent is None else parent

    def arm() -> None:
        if _prctl is None:
            return
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:       # the parent died before the signal was armed
            os._exit(1)

    return arm


def note_terminated(kind: type[KeyboardInterrupt] = Terminated) -> None:
    """Called by the CLI's SIGTERM handler (and its Ctrl-C handler, with ``KeyboardInterrupt``) before it
    raises ``kind``."""
    _stopped[0] = kind


def raise_if_terminated() -> None:
    """After a fork: raise the :class:`Terminated` or ``KeyboardInterrupt`` an at-fork hook may have swallowed
    (see the module doc)."""
    if _stopped[0] is not None:
        raise _stopped[0]()

"""A run's lifecycle around a command's body: heartbeats while it works, ``partial`` (never ``complete``)
when it stops half-way, with what it was doing and how to resume.  Used by every command that stores a run.
"""

from __future__ import annotations

from contextlib import contextmanager

from edgequant.core.errors import EdgequantError, Terminated


class Stage:
    """What a command is doing now (``now``), named in its run's status if it stops there."""

    def __init__(self, now: str):
        self.now = now


@contextmanager
def recording_partial(store, run_id: str, stage: str, resume_hint: str = "",
                      lost: tuple[type[BaseException], ...] = (), lost_note: str = ""):
    """The body of a command storing run ``run_id``; if it stops half-way the run is marked partial
    with what it was doing (``stage``, or what the body set in the yielded ``Stage.now``):

    * Ctrl-C: exit 130, "interrupted while STAGE; run X is stored as partial" and ``resume_hint``
      (SIGTERM, which the CLI turns into :class:`Terminated`: the same, exit 143);
    * one of ``lost`` (a phone gone): exit 1, the error and ``lost_note``;
    * any other ``EdgequantError``, or a bug: the run is marked partial and the error re-raised as it is.
    """
    current = Stage(stage)
    try:
        with store.heartbeat(run_id):
            yield current
    except KeyboardInterrupt as exc:
        how, code = ("SIGTERM", 143) if isinstance(exc, Terminated) else ("Ctrl-C", 130)
        finish_quietly(store, run_id, f"interrupted ({how}) while {current.now}")
        what = "interrupted (SIGTERM)" if code == 143 else "interrupted"
        raise EdgequantError(f"{what} while {current.now}; run {run_id} is stored as partial"
                             + (f"; {resume_hint}" if resume_hint else ""), code) from None
    except lost as exc:  # `except ()` catches nothing
        store.finish_run(run_id, "partial", f"stopped while {current.now}: {exc}")
        raise EdgequantError(f"{exc}; {lost_note}", 1) from None
    except EdgequantError as exc:
        finish_quietly(store, run_id, f"stopped while {current.now}: {exc}")
        raise
    except Exception as exc:   # a bug: still never left `running`; main() prints the one line
        finish_quietly(store, run_id, f"stopped while {current.now}: internal error: {type(exc).__name__}: {exc}")
        raise


def finish_quietly(store, run_id: str, detail: str) -> None:
    """Mark the run partial; if the store itself is what failed (disk full), the first error is the one told."""
    try:
        store.finish_run(run_id, "partial", detail)
    except Exception:  # noqa: BLE001 - the error being raised already names the problem
        pass

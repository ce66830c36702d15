"""The ``edgequant`` command: a thin layer over ``edgequant.pipeline`` and the stores.

Every user-facing failure is one line on stderr and a non-zero exit code:
2 for bad input, 1 for a failure while working, 130 for Ctrl-C.

The package: ``options`` (option builders shared by the commands), ``views`` (progress and rendering),
``app`` (the root group), then the commands grouped by job: ``measure`` (run), ``stages`` (bench, eval,
noise), ``build`` (quantize, imatrix, setup-onnx, runner), ``tune``, ``history`` (report, pick, tag,
compare, export) and ``devices``.  Each command parses its options, calls the library and renders.  The
library's modules are imported inside the commands, so that ``edgequant --help`` loads neither numpy nor the
pipeline.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import click

from edgequant.cli import build, devices, history, measure, stages, tune  # noqa: F401 - each registers its commands
from edgequant.cli.app import cli
from edgequant.core.children import note_terminated
from edgequant.core.errors import EdgequantError, Terminated, one_line

__all__ = ["cli", "entry", "install_stop_handlers", "main", "on_sigint", "on_sigterm"]


# ---------------------------------------------------------------------------
# entry point: library errors become one clean line


_OWNER = [0]        # the process whose command the handlers below stop (not a child forked from it)


def _stop_handler(kind: type[KeyboardInterrupt]):
    """A signal handler raising ``kind``, recorded as well for a fork that swallows the exception
    (``edgequant.core.children``); in a child forked from this process, before it execs, it does nothing
    (its traceback would land on this command's stderr)."""
    def handler(signum, frame) -> None:
        if os.getpid() != _OWNER[0]:
            return
        note_terminated(kind)
        raise kind()

    return handler


on_sigterm = _stop_handler(Terminated)          # SIGTERM unwinds like Ctrl-C (exit 143)
on_sigint = _stop_handler(KeyboardInterrupt)    # Ctrl-C: Python's KeyboardInterrupt (exit 130)


def install_stop_handlers() -> dict[int, object]:
    """This process's SIGTERM and Ctrl-C handlers (call from the main thread); returns the previous ones.
    SIGTERM (a CI job cancelled, `kill`) unwinds like Ctrl-C: partial files removed, the run marked partial.
    Where Ctrl-C is ignored (a background job) it stays ignored."""
    _OWNER[0] = os.getpid()
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)
    return previous


def main(argv: list[str] | None = None) -> int:
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        previous = install_stop_handlers()
    try:
        return _main(argv)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _main(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="edgequant", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx else "edgequant"
        click.echo(f"edgequant: error: {exc.format_message()} (see `{cmd} --help`)", err=True)
        return 2
    except click.Abort as exc:     # click turns an interrupt that escaped a command into Abort
        if isinstance(exc.__cause__, Terminated):
            click.echo("edgequant: terminated (SIGTERM)", err=True)
            return 143
        click.echo("edgequant: interrupted", err=True)
        return 130
    except EdgequantError as exc:
        click.echo(f"edgequant: error: {one_line(exc)}", err=True)
        return exc.exit_code
    except Terminated:
        click.echo("edgequant: terminated (SIGTERM)", err=True)
        return 143
    except KeyboardInterrupt:
        click.echo("edgequant: interrupted", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a traceback
        if os.environ.get("EDGEQUANT_DEBUG"):
            raise
        click.echo(f"edgequant: internal error: {type(exc).__name__}: {one_line(exc, 300)} "
                   f"(set EDGEQUANT_DEBUG=1 for a traceback and report it)", err=True)
        return 1
    return 0


def entry() -> None:
    sys.exit(main())


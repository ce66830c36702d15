"""A run's row in the store: started ``running``, kept alive by a heartbeat, finished, resumed (taken over
when its process is gone or silent), found by id, tag or alias.

Every write of a run checks in its own transaction that the run is still held by this process (hostname,
pid): a process suspended while another took its run over writes nothing more (:class:`RunTakenOver`).
:class:`RunRecords` is a part of ``edgequant.results.store.Store``, which provides the connection
(``conn``, ``transaction()``, ``_pg``, ``path``) its methods use.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import psutil

from edgequant import __version__
from edgequant.core.errors import BadInput, RunFailed

# A running command writes its run's heartbeat every HEARTBEAT_S; a run whose heartbeat is older than
# HEARTBEAT_STALE_S (any host), or whose process is gone (this host), was interrupted.
HEARTBEAT_S = 30.0
HEARTBEAT_STALE_S = 600.0

# names `edgequant compare`/`report` resolve besides run ids and tags
RUN_ALIASES = ("last", "last-complete")
TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")


class RunTakenOver(RunFailed):
    """This process's run is held by another process now (``--resume`` took it over while this one was
    suspended or silent): it stops, and writes nothing more into the run."""


def _end_children(since: float) -> None:
    """Kill the children this process started since ``since`` (a run's workers, converters): the run was
    taken over, their work is not wanted.  Older children (not the run's) are left alone."""
    for child in psutil.Process().children(recursive=True):
        try:
            if child.create_time() >= since - 1.0:      # create_time is in clock ticks
                child.kill()
        except psutil.Error:
            pass


class RunRecords:
    """The runs and tags of a store (a base of ``Store``)."""

    def start_run(self, command: str, profile: str | None, model_id: str | None, model_hash: str | None) -> str:
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        now = time.time()
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO runs (run_id, started_at, status, command, profile, model_id, model_hash,"
                " edgequant_version, hostname, pid, heartbeat_at) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, now, command, profile, model_id, model_hash, __version__,
                 socket.gethostname(), os.getpid(), now))
        return run_id

    def beat(self, run_id: str) -> None:
        """Say that this process is still working on run ``run_id``; :class:`RunTakenOver` if it is not its own
        any more."""
        with self.transaction() as conn:
            self._hold(conn, run_id)
            conn.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = ? AND status = 'running' AND hostname = ?"
                         " AND pid = ?", (time.time(), run_id, socket.gethostname(), os.getpid()))

    def _hold(self, conn, run_id: str) -> None:
        """Inside a write's transaction: the run is still held by this process (hostname, pid), or
        :class:`RunTakenOver` (the transaction is rolled back).  PostgreSQL locks the run's row until the
        write commits, so a take-over cannot slip in between; SQLite's write lock already covers it."""
        row = conn.execute("SELECT hostname, pid FROM runs WHERE run_id = ?" + (" FOR UPDATE" if self._pg else ""),
                           (run_id,)).fetchone()
        if row is None:
            return
        if (row["hostname"], row["pid"]) != (socket.gethostname(), os.getpid()):
            raise RunTakenOver(f"run {run_id} was taken over by pid {row['pid']} on {row['hostname']}; "
                               f"this process stops without writing")

    @contextmanager
    def heartbeat(self, run_id: str, every: float = HEARTBEAT_S) -> Iterator[None]:
        """While the block runs, a thread with its own connection writes the run's heartbeat every ``every``
        seconds, so that another host can tell a run that is working from one whose machine died.

        A beat that finds the run taken over by another process (this one was suspended past
        HEARTBEAT_STALE_S) stops beating and ends the children started during the block (benchmark and
        eval workers, converters), so that what the block waits on returns at once; the block's next write
        into the run is then refused (:class:`RunTakenOver`), as every write of a run taken over is."""
        if self._target == ":memory:":
            yield
            return

        stop = threading.Event()
        since = time.time()

        def beat() -> None:
            try:
                other = type(self)(self._target)
            except Exception:  # noqa: BLE001 - the run goes on; only its liveness is not written
                return
            try:
                while not stop.wait(every):
                    try:
                        other.beat(run_id)
                    except RunTakenOver:
                        if not stop.is_set():
                            _end_children(since)
                        return
                    except Exception:  # noqa: BLE001 - a busy or full database: try again next time
                        pass
            finally:
                other.close()

        thread = threading.Thread(target=beat, name=f"heartbeat-{run_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def set_prep_seconds(self, run_id: str, seconds: float) -> None:
        with self.transaction() as conn:
            self._hold(conn, run_id)
            conn.execute("UPDATE runs SET prep_seconds = ? WHERE run_id = ?", (seconds, run_id))

    def finish_run(self, run_id: str, status: str, detail: str | None = None) -> None:
        with self.transaction() as conn:
            self._hold(conn, run_id)
            conn.execute("UPDATE runs SET status = ?, status_detail = ?, finished_at = ? WHERE run_id = ?",
                         (status, detail, time.time(), run_id))

    def resume_run(self, run_id: str, force: bool = False) -> dict[str, Any]:
        """Mark an unfinished run as running again in this process (``edgequant run --resume``).

        A run left ``running`` by a process that is gone (this host) or silent for HEARTBEAT_STALE_S (any
        host) is taken over; one that still looks alive only with ``force``.  The returned run's
        ``takeover`` is the one-line notice to show then (None otherwise)."""
        run = self.run(run_id)
        if run["status"] == "complete":
            raise BadInput(f"run {run['run_id']} is complete; there is nothing to resume")
        holder = f"pid {run['pid']} on {run['hostname']}"
        takeover = None
        if run["status"] == "running":
            if not force:
                raise BadInput(f"run {run['run_id']} is still running ({holder}, {self._heartbeat_age(run)}); "
                               f"wait for it or stop it first; if you know it is gone, add --force to take it over")
            takeover = f"run {run['run_id']} looked still running ({holder}); taking it over (--force)"
        elif run.get("interrupted"):
            takeover = f"run {run['run_id']} was left running by {holder} ({run['interrupted']}); taking it over"
        with self.transaction() as conn:
            cur = conn.execute("UPDATE runs SET status = 'running', status_detail = NULL, finished_at = NULL,"
                               " hostname = ?, pid = ?, heartbeat_at = ? WHERE run_id = ? AND status = ?"
                               " AND hostname = ? AND pid = ?",
                               (socket.gethostname(), os.getpid(), time.time(), run["run_id"], run["stored_status"],
                                run["hostname"], run["pid"]))
            if cur.rowcount == 0:
                raise BadInput(f"run {run['run_id']} was resumed by another edgequant meanwhile; "
                               f"`edgequant report --list` shows who holds it")
        return {**run, "takeover": takeover}

    @staticmethod
    def _heartbeat_age(run: dict[str, Any]) -> str:
        beat = run.get("heartbeat_at") or run["started_at"]
        return f"last heartbeat {max(time.time() - beat, 0):.0f} s ago"

    @staticmethod
    def _interrupted(run: dict[str, Any]) -> str | None:
        """Why a run stored as ``running`` is not running any more, or None if it may be."""
        beat = run.get("heartbeat_at") or run["started_at"]
        if run["hostname"] == socket.gethostname():
            try:
                proc = psutil.Process(run["pid"])
                # a pid reused by a process started after the run's last heartbeat: not the run's process
                if proc.create_time() <= beat + 1:
                    return None
            except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
                pass
            return f"interrupted: its process (pid {run['pid']}) ended before the run finished"
        age = time.time() - beat
        if age > HEARTBEAT_STALE_S:
            return (f"interrupted: no heartbeat from {run['hostname']} (pid {run['pid']}) for {age / 60:.0f} min "
                    f"(limit {HEARTBEAT_STALE_S / 60:.0f} min)")
        return None

    def run(self, run_id: str) -> dict[str, Any]:
        """One run by id, by tag (`edgequant tag`), or `last` / `last-complete`."""
        if run_id in RUN_ALIASES:
            where = "WHERE status = 'complete' " if run_id == "last-complete" else ""
            row = self.conn.execute(f"SELECT * FROM runs {where}ORDER BY started_at DESC, rowid DESC LIMIT 1"
                                    ).fetchone()
            if row is None:
                what = "complete runs" if where else "runs"
                raise BadInput(f"results database {self.path} holds no {what} yet; run `edgequant run` first")
        else:
            row = self.conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                row = self.conn.execute("SELECT runs.* FROM tags JOIN runs ON runs.run_id = tags.run_id"
                                        " WHERE tags.name = ?", (run_id,)).fetchone()
            if row is None:
                raise BadInput(f"run '{run_id}' is not in {self.path} (neither a run id nor a tag); "
                               f"`edgequant report --list` shows the runs")
        out = dict(row)
        out.pop("rowid", None)  # PostgreSQL's emulated rowid column
        out["stored_status"] = out["status"]
        out["interrupted"] = self._interrupted(out) if out["status"] == "running" else None
        if out["interrupted"]:
            out["status"] = "partial"
            out["status_detail"] = out["status_detail"] or out["interrupted"]
        return out

    def tag(self, run_id: str, name: str) -> str:
        """Point tag ``name`` at a run (moving it if it exists); returns the run id."""
        if not TAG_NAME.fullmatch(name) or name in RUN_ALIASES:
            raise BadInput(f"tag name {name!r}: use a letter, then letters, digits, '.', '_' or '-' "
                           f"(at most 64), and not {' or '.join(RUN_ALIASES)}")
        if self.conn.execute("SELECT run_id FROM runs WHERE run_id = ?", (name,)).fetchone():
            raise BadInput(f"tag name {name!r} is a run id; pick another name")
        target = self.run(run_id)["run_id"]
        with self.transaction() as conn:
            conn.execute("INSERT INTO tags (name, run_id, tagged_at) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE"
                         " SET run_id = excluded.run_id, tagged_at = excluded.tagged_at", (name, target, time.time()))
        return target

    def tags(self, run_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT name, run_id, tagged_at FROM tags"
        args: tuple = ()
        if run_id is not None:
            sql += " WHERE run_id = ?"
            args = (run_id,)
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY name", args)]

    def runs(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT run_id FROM runs ORDER BY started_at DESC, rowid DESC LIMIT ?", (limit,))
        return [self.run(r["run_id"]) for r in rows.fetchall()]

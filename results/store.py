"""The results store: SQLite or PostgreSQL, named append-only migrations, one row per measurement.

SQLite (a file path) is the embedded default; a ``postgresql://`` URL stores
to a PostgreSQL server shared by several hosts (``edgequant.results.pg`` holds
the few dialect translations).  The same migrations run on both.

Every write happens in a transaction.  A run is inserted as ``running`` and
ends ``complete`` only when every rung finished; an interrupted or failed run
ends ``partial``/``failed``, and a run still ``running`` whose process is gone
(this host) or whose heartbeat stopped (any host) is reported as ``partial``
(interrupted) and can be taken over by ``--resume``.  Every write of a run
(its rows, its status, its heartbeat) checks in the same transaction that the
run is still held by this process (hostname, pid): a process suspended while
another took its run over writes nothing more (:class:`RunTakenOver`).  A
figure that is not a finite number fails its rung instead of the transaction.
Only an empty database or one carrying the ``_migrations`` table is ever
written to.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import psutil

from edgequant import __version__
from edgequant.core.errors import BadInput, RunFailed
from edgequant.results.pg import PgConnection, is_postgres_url
from edgequant.results.migrations import MIGRATIONS


# what a measurement row measured (its ``stage`` column): llama-bench-like speed and memory ("bench"), the eval
# suite ("quality"), a [sustained] series ("sustained"), tune's verdicts ("tune"); and where (``place``):
# "host" (this machine) or "device" (a phone).  Old rows carried them only in their params, from which
# migration 007 back-fills the columns by the same rule.
STAGES = ("bench", "quality", "sustained", "tune")
PLACES = ("host", "device")


def stage_of(params: dict) -> str:
    """The stage a row with these params belongs to (``STAGES``)."""
    return str(params.get("stage") or "bench")


def place_of(params: dict) -> str:
    """The kind of place a row with these params was measured on (``PLACES``)."""
    return "device" if params.get("runner") == "device" or params.get("where") == "device" else "host"

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


@dataclass(frozen=True)
class Measurement:
    metric: str
    value: float
    unit: str
    stddev: float | None = None
    repetitions: int | None = None
    detail: dict | None = None  # e.g. a confidence interval, a p-value


@dataclass(frozen=True)
class RowKey:
    """What every measurement row of one rung on one device shares."""

    model_id: str
    model_hash: str
    quant: str
    artifact_sha256: str
    is_reference: bool
    device_id: str
    device: dict
    runtime: str
    runtime_version: str
    params: dict

    @property
    def stage(self) -> str:
        return stage_of(self.params)

    @property
    def place(self) -> str:
        return place_of(self.params)


def _finite_only(measurements: Iterable[Measurement]) -> tuple[list[Measurement], list[str]]:
    """(the measurements whose value is a finite number, with a non-finite stddev dropped; "METRIC=VALUE"
    of the others)."""
    good, bad = [], []
    for m in measurements:
        if not math.isfinite(float(m.value)):     # None is a bug, not a figure: TypeError
            bad.append(f"{m.metric}={m.value}")
            continue
        if m.stddev is not None and not math.isfinite(float(m.stddev)):
            m = replace(m, stddev=None)
        good.append(m)
    return good, bad


OPEN_WAIT_SECONDS = 60.0


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _end_children(since: float) -> None:
    """Kill the children this process started since ``since`` (a run's workers, converters): the run was
    taken over, their work is not wanted.  Older children (not the run's) are left alone."""
    for child in psutil.Process().children(recursive=True):
        try:
            if child.create_time() >= since - 1.0:      # create_time is in clock ticks
                child.kill()
        except psutil.Error:
            pass


def sqlite_problem(path: str, exc: sqlite3.Error) -> str:
    """One line telling apart what went wrong with a SQLite results database, with the advice that fits."""
    text = str(exc)
    low = text.lower()
    where = Path(path).expanduser()
    if where.is_dir():
        return f"results database {path} is a folder, not a file; pass a file path with --db"
    if "full" in low:
        free = ""
        try:
            free = f" ({shutil.disk_usage(where.parent).free / 2**20:,.1f} MiB free)"
        except OSError:
            pass
        return (f"results database {path}: the disk holding it is full{free}; free some space or pass a "
                f"file on another disk with --db")
    if "readonly" in low or "read-only" in low or (where.exists() and not os.access(where, os.W_OK)) \
            or not os.access(where.parent, os.W_OK):
        return (f"results database {path} cannot be written (a read-only file or file system: {text}); "
                f"make it writable or pass another file with --db")
    if _is_busy(exc):
        return (f"results database {path} is locked by another process ({text}); if another edgequant "
                f"holds it, wait for it, or pass another file with --db")
    return f"results database {path}: not usable ({text}); pass another file with --db"


class Store:
    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._target = self.path            # what opens it again (the heartbeat's own connection)
        self._pg: PgConnection | None = None
        self._opened = False
        if is_postgres_url(self.path):
            self._pg = PgConnection(self.path)
            self.conn = self._pg
            self.path = self._pg.display  # never the password
            try:
                self._check_ours()
                self._migrate()
            except BaseException:
                self._pg.close()
                raise
            return
        if self.path != ":memory:":
            parent = Path(self.path).expanduser().parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BadInput(f"results database {self.path}: cannot create its folder: {exc}") from None
        # Switching a fresh file to WAL needs the file to itself, and SQLite answers "database is
        # locked" at once (without its busy handler) when another process opens it at that moment:
        # several writers starting together retry the whole opening for up to OPEN_WAIT_SECONDS.
        deadline = time.monotonic() + OPEN_WAIT_SECONDS
        pause = 0.05
        while True:
            try:
                self._open_sqlite()
                self._opened = True
                return
            except sqlite3.OperationalError as exc:
                self._close_quietly()
                if _is_busy(exc) and time.monotonic() < deadline:
                    time.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
                raise BadInput(sqlite_problem(self.path, exc)) from None
            except sqlite3.DatabaseError as exc:
                self._close_quietly()
                raise BadInput(f"results database {self.path}: not a usable SQLite database ({exc}); "
                               f"pass another file with --db") from None
            except BaseException:
                self._close_quietly()
                raise

    def _open_sqlite(self) -> None:
        # usable from the farm's phone threads, which call it one at a time (edgequant.farm.LockedStore)
        self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA foreign_keys = ON")
        self._check_ours()      # before the journal mode or any table is touched
        if self.path != ":memory:":
            mode = self.conn.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                self.conn.execute("PRAGMA journal_mode = WAL")
        self._migrate()

    def _close_quietly(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass
            self.conn = None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def dialect(self) -> str:
        return "postgresql" if self._pg is not None else "sqlite"

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        pg = self._pg
        if pg is None:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self.conn
                except BaseException:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise
                else:
                    self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if not self._opened:         # opening retries a busy database itself
                    raise
                if self.conn.in_transaction:
                    try:
                        self.conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise RunFailed(sqlite_problem(self.path, exc) + "; nothing of the failed write was stored") \
                    from None
            return
        try:
            pg.execute("BEGIN")
        except pg.errors as exc:
            raise pg.failure(exc) from None
        try:
            yield pg
            pg.execute("COMMIT")
        except pg.errors as exc:
            pg.rollback_quietly()
            raise pg.failure(exc) from None
        except BaseException:
            pg.rollback_quietly()
            raise

    def _ddl(self, statement: str) -> None:
        if self._pg is not None:
            self._pg.execute_ddl(statement)
        else:
            self.conn.execute(statement)

    # -- migrations ---------------------------------------------------------

    def _lock_schema(self) -> None:
        """Inside a transaction: serialize schema changes with every other writer (SQLite's
        BEGIN IMMEDIATE already holds the write lock; PostgreSQL takes an advisory lock)."""
        if self._pg is not None:
            self._pg.lock_schema()

    def _tables(self) -> set[str]:
        """Every table and view of the database (its schema, on PostgreSQL), whoever made them."""
        if self._pg is not None:
            return self._pg.table_names()
        return {r["name"] for r in self.conn.execute("PRAGMA main.table_list")
                if not r["name"].startswith("sqlite_")}

    def _check_ours(self) -> None:
        """Only reads: a database edgequant may write to is empty or carries its migrations table, and was
        not written by a newer edgequant; BadInput (nothing changed) for any other."""
        tables = self._tables()
        if not tables:
            return
        if "_migrations" not in tables:
            shown = ", ".join(sorted(tables)[:4]) + (", ..." if len(tables) > 4 else "")
            raise BadInput(f"results database {self.path} is not an edgequant database (it holds {shown}); "
                           f"edgequant writes only to an empty database or its own: pass another --db "
                           f"(nothing was changed)")
        self._refuse_newer({r["name"] for r in self.conn.execute("SELECT name FROM _migrations")})

    def _refuse_newer(self, applied: set[str]) -> None:
        newer = sorted(applied - {name for name, _ in MIGRATIONS})
        if newer:
            raise BadInput(f"results database {self.path} has migrations this edgequant does not know "
                           f"({', '.join(newer)}): it was written by a newer edgequant; upgrade edgequant "
                           f"or use another --db (nothing was changed)")

    def _migrate(self) -> None:
        # Several hosts or processes may open a fresh database at once: each migration is applied
        # under the schema lock, after checking again that nobody applied it meanwhile.
        with self.transaction() as conn:
            self._lock_schema()
            self._ddl("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
            applied = {r["name"] for r in conn.execute("SELECT name FROM _migrations")}
        self._refuse_newer(applied)
        for name, sql in MIGRATIONS:
            if name in applied:
                continue
            with self.transaction() as conn:
                self._lock_schema()
                if conn.execute("SELECT name FROM _migrations WHERE name = ?", (name,)).fetchone():
                    continue
                for statement in sql.split(";"):
                    if statement.strip():
                        self._ddl(statement)
                conn.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (name, time.time()))

    def migrations(self) -> list[str]:
        """Applied migration names, in the order they were applied."""
        return [r["name"] for r in self.conn.execute("SELECT name FROM _migrations ORDER BY rowid")]

    # -- runs ---------------------------------------------------------------

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
                other = Store(self._target)
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

    # -- artifacts and measurements ------------------------------------------

    def record_artifact(self, info: dict[str, Any]) -> None:
        with self.transaction() as conn:
            cols = ("sha256", "model_hash", "quant", "format", "size_bytes", "n_params", "bits_per_weight",
                    "tensor_types", "cache_key", "path", "created_at")
            values = {**info, "tensor_types": json.dumps(info["tensor_types"], sort_keys=True)}
            conn.execute(
                f"INSERT INTO artifacts ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
                " ON CONFLICT (sha256) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in cols[1:]), [values[c] for c in cols])

    def artifact(self, sha256: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM artifacts WHERE sha256 = ?", (sha256,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        out["tensor_types"] = json.loads(out["tensor_types"])
        return out

    def record_rung(self, run_id: str, key: RowKey, measurements: Iterable[Measurement],
                    status: str | None = "ok", detail: str | None = None,
                    cases: Iterable[dict] = (), suite: str | None = None) -> str | None:
        """Store one rung's measurements (and eval cases) and its status in a single transaction.

        ``status=None`` adds rows without touching the rung's status (a later stage of the same rung).
        A figure that is not a finite number (NaN, infinity: a damaged artifact) is not stored: the rung
        is stored as ``failed`` naming it, with its finite figures.  Returns the status stored (None: untouched).
        """
        with self.transaction() as conn:
            self._hold(conn, run_id)
            return self._write_rung(conn, run_id, key, measurements, status, detail, cases, suite)

    def record_rungs(self, run_id: str, entries: Iterable[tuple[RowKey, Iterable[Measurement], str | None,
                                                                  str | None]]) -> list[str | None]:
        """Several rows sets of one measurement (a rung's variants: depths, cache types) in one transaction:
        an interrupted run holds all of them or none.  Each entry is (key, measurements, status, detail);
        returns the status stored for each (``record_rung``'s rule for figures that are not finite)."""
        with self.transaction() as conn:
            self._hold(conn, run_id)
            return [self._write_rung(conn, run_id, key, measurements, status, detail, (), None)
                    for key, measurements, status, detail in entries]

    def _write_rung(self, conn, run_id: str, key: RowKey, measurements: Iterable[Measurement],
                    status: str | None, detail: str | None, cases: Iterable[dict], suite: str | None) -> str | None:
        now = time.time()
        measurements, bad = _finite_only(measurements)
        if bad:
            status = "failed"
            detail = "; ".join(d for d in (detail, f"not a finite number: {', '.join(bad)}") if d)
        for m in measurements:
            conn.execute(
                "INSERT INTO measurements (run_id, model_id, model_hash, quant, artifact_sha256,"
                " is_reference, device_id, device, runtime, runtime_version, params, metric, value,"
                " stddev, repetitions, unit, measured_at, detail, stage, place) VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, key.model_id, key.model_hash, key.quant, key.artifact_sha256,
                 int(key.is_reference), key.device_id, json.dumps(key.device, sort_keys=True),
                 key.runtime, key.runtime_version, json.dumps(key.params, sort_keys=True),
                 m.metric, float(m.value), m.stddev, m.repetitions, m.unit, now,
                 json.dumps(m.detail, sort_keys=True) if m.detail is not None else None, key.stage, key.place))
        for c in cases:
            conn.execute(
                "INSERT INTO eval_cases (run_id, quant, device_id, suite, case_id, format, ok,"
                " refusal, reason, fields, output, stopped, n_tokens)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (run_id, quant, device_id, case_id) DO UPDATE SET suite = excluded.suite,"
                " format = excluded.format, ok = excluded.ok, refusal = excluded.refusal,"
                " reason = excluded.reason, fields = excluded.fields, output = excluded.output,"
                " stopped = excluded.stopped, n_tokens = excluded.n_tokens",
                (run_id, key.quant, key.device_id, suite or "", c["case_id"], c["format"], int(c["ok"]),
                 int(c["refusal"]), c["reason"], json.dumps(c["fields"], sort_keys=True), c["output"],
                 c.get("stopped"), c.get("n_tokens")))
        if status is not None:
            conn.execute(
                "INSERT INTO rung_status (run_id, quant, device_id, status, detail) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (run_id, quant, device_id) DO UPDATE SET status = excluded.status,"
                " detail = excluded.detail", (run_id, key.quant, key.device_id, status, detail))
        return status

    def measurements(self, run_id: str, stage: str | Iterable[str] | None = None,
                     place: str | None = None, device_id: str | None = None) -> list[dict[str, Any]]:
        """The run's rows in the order stored; ``stage`` (one or several of ``STAGES``), ``place`` (``PLACES``)
        and ``device_id`` select by those columns."""
        sql = ("SELECT run_id, model_id, model_hash, quant, artifact_sha256, is_reference, device_id, device,"
               " runtime, runtime_version, params, metric, value, stddev, repetitions, unit, measured_at, detail,"
               " stage, place FROM measurements WHERE run_id = ?")
        args: list[Any] = [run_id]
        if stage is not None:
            stages = [stage] if isinstance(stage, str) else list(stage)
            sql += f" AND stage IN ({', '.join('?' * len(stages))})"
            args += stages
        if place is not None:
            sql += " AND place = ?"
            args.append(place)
        if device_id is not None:
            sql += " AND device_id = ?"
            args.append(device_id)
        rows = self.conn.execute(sql + " ORDER BY id", args)
        out = []
        for r in rows:
            d = dict(r)
            d["device"] = json.loads(d["device"])
            d["params"] = json.loads(d["params"])
            d["detail"] = json.loads(d["detail"]) if d["detail"] else None
            d["is_reference"] = bool(d["is_reference"])
            out.append(d)
        return out

    def measured(self, run_id: str, stage: str, place: str | None = None) -> set[tuple[str, str]]:
        """(quant, device_id) of every rung holding rows of ``stage`` in the run (at ``place`` if given)."""
        sql = "SELECT DISTINCT quant, device_id FROM measurements WHERE run_id = ? AND stage = ?"
        args: list[Any] = [run_id, stage]
        if place is not None:
            sql += " AND place = ?"
            args.append(place)
        return {(r["quant"], r["device_id"]) for r in self.conn.execute(sql, args)}

    def eval_cases(self, run_id: str, quant: str | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT quant, device_id, suite, case_id, format, ok, refusal, reason, fields, output, stopped,"
               " n_tokens FROM eval_cases WHERE run_id = ?")
        args: list[Any] = [run_id]
        if quant is not None:
            sql += " AND quant = ?"
            args.append(quant)
        out = []
        for r in self.conn.execute(sql + " ORDER BY rowid", args):
            d = dict(r)
            d["fields"] = json.loads(d["fields"])
            d["ok"], d["refusal"] = bool(d["ok"]), bool(d["refusal"])
            out.append(d)
        return out

    def record_split(self, suite: str, split: dict[str, Any]) -> None:
        """A calibration/evaluation split of a suite (edgequant.quantize.imatrix.Split.record())."""
        with self.transaction() as conn:
            for role in ("calibration", "evaluation"):
                for case_id in split[role]:
                    conn.execute("INSERT INTO calibration_splits (split_sha256, suite, suite_sha256, case_id, role)"
                                 " VALUES (?, ?, ?, ?, ?) ON CONFLICT (split_sha256, case_id) DO NOTHING",
                                 (split["split_sha256"], suite, split["suite_sha256"], case_id, role))

    def split_cases(self, split_sha256: str) -> dict[str, list[str]]:
        """Case ids per role of a stored split."""
        out: dict[str, list[str]] = {"calibration": [], "evaluation": []}
        for r in self.conn.execute("SELECT case_id, role FROM calibration_splits WHERE split_sha256 = ?"
                                   " ORDER BY case_id", (split_sha256,)):
            out[r["role"]].append(r["case_id"])
        return out

    def rung_statuses(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT quant, device_id, status, detail FROM rung_status WHERE run_id = ?"
                                 " ORDER BY rowid", (run_id,))
        return [dict(r) for r in rows]

    # -- stage resources (edgequant.estimate) -----------------------------------

    def record_stages(self, run_id: str, stages: Iterable[dict[str, Any]]) -> None:
        """Rows of ``stage_resources`` in one transaction; each a dict with ``stage``, ``quant``, ``device_id``,
        ``status`` and optionally ``n_params``, ``seconds``, ``peak_rss_bytes``, ``reused``, ``detail``,
        ``data_bytes``."""
        now = time.time()
        cols = ("stage", "quant", "device_id", "n_params", "seconds", "peak_rss_bytes", "status", "reused", "detail",
                "data_bytes")
        with self.transaction() as conn:
            for st in stages:
                values = [st.get(c) for c in cols]
                values[cols.index("reused")] = int(bool(st.get("reused")))
                conn.execute(f"INSERT INTO stage_resources (run_id, {', '.join(cols)}, measured_at)"
                             f" VALUES (?, {', '.join('?' * len(cols))}, ?)", [run_id, *values, now])

    def stage_resources(self, run_id: str) -> list[dict[str, Any]]:
        """A run's stage rows, in the order they were stored."""
        rows = self.conn.execute(
            "SELECT run_id, stage, quant, device_id, n_params, seconds, peak_rss_bytes, status, reused, detail,"
            " data_bytes, measured_at FROM stage_resources WHERE run_id = ? ORDER BY id", (run_id,))
        return [{**dict(r), "reused": bool(r["reused"])} for r in rows]

    def stage_history(self, device_id: str, limit: int = 500) -> list[dict[str, Any]]:
        """The latest timed ``ok`` stage rows of one place, newest first: the speed this place has shown, for
        the next run's time estimate (a reused artifact's row carries the time it was built in)."""
        rows = self.conn.execute(
            "SELECT stage, quant, n_params, seconds, peak_rss_bytes, measured_at FROM stage_resources"
            " WHERE device_id = ? AND status = 'ok' AND seconds IS NOT NULL"
            " ORDER BY measured_at DESC, id DESC LIMIT ?", (device_id, limit))
        return [dict(r) for r in rows]

    def speed_history(self, device_id: str, limit: int = 2000) -> list[tuple[str, str, float, int]]:
        """(quant, metric, value, n_params) of the latest benchmark rows (``pp_tps``, ``tg_tps``) of one place,
        newest first, each with the parameter count its rung stored beside it."""
        rows = self.conn.execute(
            "SELECT m.quant, m.metric, m.value, m.params, p.value AS n_params FROM measurements m"
            " JOIN measurements p ON p.run_id = m.run_id AND p.quant = m.quant AND p.device_id = m.device_id"
            " AND p.metric = 'n_params' AND p.params = m.params"
            " WHERE m.device_id = ? AND m.metric IN ('pp_tps', 'tg_tps')"
            " ORDER BY m.measured_at DESC, m.id DESC LIMIT ?", (device_id, limit))
        out = []
        for r in rows:
            params = json.loads(r["params"])
            if params.get("stage", "bench") != "bench" or not r["n_params"]:
                continue
            out.append((r["quant"], r["metric"], float(r["value"]), int(r["n_params"])))
        return out

    # -- A/A noise floors (edgequant noise) ------------------------------------

    def record_noise_floor(self, device_id: str, quant: str, artifact_sha256: str, params: dict,
                           floors: dict[str, tuple[float, list[float]]]) -> None:
        """A place's run-to-run spread: metric -> (floor in %, the medians it came from), in one transaction."""
        now = time.time()
        with self.transaction() as conn:
            for metric, (floor_pct, medians) in floors.items():
                conn.execute("INSERT INTO noise_floors (device_id, quant, artifact_sha256, metric, floor_pct, n_runs,"
                             " medians, params, measured_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (device_id, quant, artifact_sha256, metric, float(floor_pct), len(medians),
                              json.dumps(medians), json.dumps(params, sort_keys=True), now))

    def noise_floors(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        """The latest stored floor of every (device_id, quant, metric)."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for r in self.conn.execute("SELECT device_id, quant, artifact_sha256, metric, floor_pct, n_runs, medians,"
                                   " params, measured_at FROM noise_floors ORDER BY measured_at, id"):
            d = dict(r)
            d["medians"], d["params"] = json.loads(d["medians"]), json.loads(d["params"])
            out[(d["device_id"], d["quant"], d["metric"])] = d
        return out

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
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from edgequant.core.errors import BadInput, RunFailed
from edgequant.results.pg import PgConnection, is_postgres_url
from edgequant.results.migrations import MIGRATIONS
from edgequant.results.resources import PlaceHistory
from edgequant.results.runs import RunRecords, RunTakenOver  # noqa: F401 - RunTakenOver: callers import it here


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


class Store(RunRecords, PlaceHistory):
    """The results database (see the module docstring); its runs' lifecycle is ``RunRecords``
    (``edgequant.results.runs``), what places have shown is ``PlaceHistory`` (``edgequant.results.resources``)."""

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

"""A throwaway PostgreSQL server for the shared-store tests.

``pg_server`` (session scope) runs ``initdb`` in a fresh temporary folder and
starts ``postgres`` on a free loopback port with trust authentication; it is
stopped and deleted at the end of the session.  PostgreSQL refuses to run as
root, so under root the cluster belongs to the ``postgres`` user (created by
Debian's package) and its commands run through ``runuser``.

Without PostgreSQL binaries the tests that need the server are skipped on a
developer machine, and fail when ``EDGEQUANT_REQUIRE_PG`` is set (CI sets it).
``PG_BIN`` points at a ``bin`` folder holding ``initdb`` and ``pg_ctl``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER = "edgequant"


def find_pg_bin() -> Path | None:
    env = os.environ.get("PG_BIN")
    if env:  # authoritative when set
        return Path(env) if (Path(env) / "initdb").is_file() and (Path(env) / "pg_ctl").is_file() else None
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    host: str
    port: int
    root: Path

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        auth = SUPERUSER + (f":{password}" if password else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A fresh, empty database on the server; returns its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _run_as(user: str | None, argv: list[str], **kw) -> subprocess.CompletedProcess:
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def unavailable(reason: str):
    if os.environ.get("EDGEQUANT_REQUIRE_PG"):
        pytest.fail(f"PostgreSQL is required (EDGEQUANT_REQUIRE_PG is set) but {reason}")
    pytest.skip(f"PostgreSQL not available: {reason} (set EDGEQUANT_REQUIRE_PG=1 to make this a failure)")


@pytest.fixture(scope="session")
def pg_server():
    bin_dir = find_pg_bin()
    if bin_dir is None:
        unavailable("no initdb/pg_ctl found (install Debian's postgresql, or set PG_BIN)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("psycopg is not installed")
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no 'postgres' user to own the cluster")
        user = "postgres"
    root = Path(tempfile.mkdtemp(prefix="edgequant-pg-"))
    if user is not None:
        shutil.chown(root, user)
    data = root / "data"
    port = free_port()
    r = _run_as(user, [str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
                       "--encoding=UTF8", "--no-sync"], timeout=120)
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed: {r.stderr[-2000:]}")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
    r = _run_as(user, [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", opts,
                       "-w", "-t", "60", "start"], timeout=120)
    if r.returncode != 0:
        log = (root / "server.log").read_text(errors="replace")[-2000:] if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed: {r.stderr[-1000:]} {log}")
    try:
        yield PgServer("127.0.0.1", port, root)
    finally:
        _run_as(user, [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def pg_url(pg_server) -> str:
    """The URL of a fresh, empty database on the session's server."""
    return pg_server.new_database()

"""A command that stops half-way leaves its run stored as partial, saying what it was doing: the one
``recording_partial`` block every run-storing command (run, bench, eval, tune) goes through."""

from __future__ import annotations

import uuid

import pytest

from conftest import assert_one_line_error, cli_env, run_cli
from test_cli import tiny_profile

from edgequant.results.lifecycle import recording_partial
from edgequant.pipeline.device_run import DeviceLost
from edgequant.devices.transport import DeviceError
from edgequant.core.errors import BadInput, EdgequantError
from edgequant.results.store import Store


def _pg_rows(url: str, sql: str) -> list[dict]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(sql).fetchall()


def test_bench_stopped_by_a_refused_store_write_leaves_the_run_partial(tiny_checkpoint, pg_server, tmp_path):
    """A shared PostgreSQL store where this user may no longer write measurements: `edgequant bench`
    starts its run, measures the first rung, the write is refused, and the run ends partial, not running."""
    import psycopg

    env = cli_env(tmp_path)
    profile = tiny_profile(tmp_path, types=["Q4_0"], n_prompt=16, n_gen=4)
    built = run_cli("quantize", "--model", str(tiny_checkpoint), "--profile", str(profile), env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    admin_url = pg_server.new_database()
    dbname = admin_url.rsplit("/", 1)[1]
    role = "bencher_" + uuid.uuid4().hex[:8]       # not a superuser: privileges apply to it
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'ALTER DATABASE "{dbname}" OWNER TO "{role}"')
    url = f"postgresql://{role}@{pg_server.host}:{pg_server.port}/{dbname}"
    Store(url).close()                                 # the tables, created by (and owned by) the role
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'REVOKE INSERT ON measurements FROM "{role}"')

    res = run_cli("bench", "--model", str(tiny_checkpoint), "--profile", str(profile), "--db", url, env=env)
    assert res.returncode == 1, res.stderr[-3000:]
    assert_one_line_error(res.stderr, "permission denied", "measurements")
    (run,) = _pg_rows(admin_url, "SELECT run_id, status, status_detail FROM runs")
    assert run["status"] == "partial", run
    assert run["status_detail"].startswith("stopped while benchmarking: ") and "permission denied" in \
        run["status_detail"]
    # it got as far as the first rung: its artifact is recorded, none of its figures are
    assert [a["quant"] for a in _pg_rows(admin_url, "SELECT quant FROM artifacts")] == ["BF16"]
    assert _pg_rows(admin_url, "SELECT count(*) AS n FROM measurements") == [{"n": 0}]


# ---------------------------------------------------------------------------
# the block itself, on a real SQLite store


@pytest.fixture
def store_run(tmp_path):
    with Store(tmp_path / "results.db") as store:
        yield store, store.start_run("edgequant test", "p", "m", "h")


def test_ctrl_c_is_exit_130_naming_the_stage_it_reached_and_the_resume_hint(store_run):
    store, run_id = store_run
    with pytest.raises(EdgequantError) as exc:
        with recording_partial(store, run_id, "quantizing", f"`edgequant run --resume {run_id}` finishes it") as st:
            st.now = "benchmarking"
            raise KeyboardInterrupt
    assert exc.value.exit_code == 130
    assert str(exc.value) == (f"interrupted while benchmarking; run {run_id} is stored as partial; "
                              f"`edgequant run --resume {run_id}` finishes it")
    run = store.run(run_id)
    assert (run["status"], run["status_detail"]) == ("partial", "interrupted (Ctrl-C) while benchmarking")


def test_an_error_is_reraised_unchanged_and_a_lost_phone_gets_its_note(store_run):
    store, run_id = store_run
    refused = BadInput("the suite is gone")
    with pytest.raises(BadInput) as exc:
        with recording_partial(store, run_id, "running the eval suite"):
            raise refused
    assert exc.value is refused
    assert store.run(run_id)["status_detail"] == "stopped while running the eval suite: the suite is gone"

    gone = DeviceLost("X", "pushing Q8_0", DeviceError("offline", "the connection dropped"))
    with pytest.raises(EdgequantError) as exc:
        with recording_partial(store, run_id, "tuning", lost=(DeviceLost, DeviceError),
                               lost_note=f"stored in run {run_id}"):
            raise gone
    assert exc.value.exit_code == 1 and str(exc.value) == f"{gone}; stored in run {run_id}"
    assert store.run(run_id)["status_detail"] == f"stopped while tuning: {gone}"


def test_a_body_that_finishes_leaves_the_run_to_the_command(store_run):
    store, run_id = store_run
    with recording_partial(store, run_id, "benchmarking"):
        pass
    assert store.run(run_id)["status"] == "running"

"""The one worker runner (bench/worker.py) of the host bench and eval workers, and the one exit-code classifier
(edgequant/core/status.py): real child processes that hang, crash, are killed or answer; nothing is patched."""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest

from edgequant.bench import worker
from edgequant.bench.host import run_worker as host_run_worker
from edgequant.core.errors import BenchError
from edgequant.bench.quality import EvalError, call_worker
from edgequant.core.status import FAILURES, RungStatus, classify_exit, exit_signal

WORKERS = {
    # reads its request, then hangs without printing anything, with a child of its own that hangs too
    "eqw_silent": """
        import subprocess, sys, time
        req = sys.stdin.read()
        child = subprocess.Popen(["sleep", "3600"])
        open(__import__("json").loads(req)["pidfile"], "w").write(f"{child.pid}\\n")
        time.sleep(3600)
    """,
    # never reads its request (a request larger than a pipe's buffer cannot be written): hangs silently
    "eqw_deaf": """
        import time
        time.sleep(3600)
    """,
    # keeps printing progress, never finishes
    "eqw_chatty": """
        import sys, time
        sys.stdin.read()
        i = 0
        while True:
            i += 1
            sys.stderr.write(f"progress step {i}\\n"); sys.stderr.flush()
            time.sleep(0.05)
    """,
    "eqw_ok": """
        import json, sys
        req = json.loads(sys.stdin.read())
        sys.stderr.write("progress load\\nconfig repack=1 (forced)\\nsome log line\\nprogress done\\n")
        print("noise before the result")
        print(json.dumps({"echo": req["n"], "big": "x" * 300000}))
    """,
    "eqw_error": """
        import json, sys
        sys.stdin.read()
        sys.stderr.write("progress load\\n")
        print(json.dumps({"error": "model file is broken"}))
        sys.exit(1)
    """,
    "eqw_exit3": """
        import sys
        sys.stdin.read()
        sys.stderr.write("first\\nlast words\\n")
        sys.exit(3)
    """,
    "eqw_noresult": """
        import sys
        sys.stdin.read()
        print("not json")
    """,
    "eqw_segv": """
        import os, signal, sys
        sys.stdin.read()
        sys.stderr.write("progress pp 1/3\\nabout to crash\\n"); sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
    """,
    "eqw_sigkill": """
        import os, signal, sys
        sys.stdin.read()
        sys.stderr.write("progress tg 2/3\\n"); sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """,
}


@pytest.fixture
def workers(tmp_path, monkeypatch) -> Path:
    """The worker modules above, importable by ``python -m`` in the child (PYTHONPATH is inherited)."""
    folder = tmp_path / "workers"
    folder.mkdir()
    for name, body in WORKERS.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    return folder


def _gone(pid: int, within: float) -> bool:
    """True once ``pid`` no longer runs (gone, or a zombie waiting for its new parent to reap it)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_a_worker_that_hangs_silently_is_killed_at_its_deadline_with_its_children(workers, tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    t0 = time.monotonic()
    # long enough for the worker to start and write its child's pid on a busy machine
    run = worker.run_worker("eqw_silent", {"pidfile": str(pidfile)}, timeout=6.0)
    elapsed = time.monotonic() - t0
    assert run.status is RungStatus.TIMEOUT and run.code is None
    assert 6.0 <= elapsed < 30, elapsed
    grandchild = int(pidfile.read_text())
    assert _gone(grandchild, within=10), "the worker's own child outlived the deadline"


def test_a_worker_that_never_reads_its_request_is_killed_at_its_deadline(workers):
    t0 = time.monotonic()
    run = worker.run_worker("eqw_deaf", {"pad": "x" * (4 << 20)}, timeout=1.5)
    assert run.status is RungStatus.TIMEOUT
    assert time.monotonic() - t0 < 30


def test_a_worker_that_keeps_printing_is_killed_at_its_deadline_too(workers):
    phases: list[str] = []
    t0 = time.monotonic()
    run = worker.run_worker("eqw_chatty", {}, timeout=6.0, on_progress=phases.append)
    assert run.status is RungStatus.TIMEOUT
    assert time.monotonic() - t0 < 30
    assert phases and phases[0] == "step 1" and run.phase == phases[-1]


def test_a_result_progress_and_config_come_back(workers):
    phases: list[str] = []
    run = worker.run_worker("eqw_ok", {"n": 41}, timeout=120, on_progress=phases.append)
    assert run.status is RungStatus.OK and run.code == 0
    assert run.data["echo"] == 41 and len(run.data["big"]) == 300000   # larger than a pipe's buffer
    assert phases == ["load", "done"]
    assert run.config["repack"] == "1"
    assert run.stderr_tail == ["some log line"]


@pytest.mark.parametrize("module, status, code, error, signal_number", [
    ("eqw_error", RungStatus.FAILED, 1, "model file is broken", None),
    ("eqw_exit3", RungStatus.FAILED, 3, None, None),
    ("eqw_noresult", RungStatus.FAILED, 0, None, None),
    ("eqw_segv", RungStatus.CRASHED, -signal.SIGSEGV, None, signal.SIGSEGV),
    ("eqw_sigkill", RungStatus.OOM, -signal.SIGKILL, None, signal.SIGKILL),
])
def test_how_a_worker_ended_is_classified_once(workers, module, status, code, error, signal_number):
    run = worker.run_worker(module, {}, timeout=120)
    assert (run.status, run.code, run.error, run.signal) == (status, code, error, signal_number)


def test_the_host_bench_names_each_ending(workers, tmp_path):
    path = tmp_path / "m.gguf"
    with pytest.raises(BenchError) as err:
        host_run_worker({"pidfile": str(tmp_path / "p")}, "eqw_silent", 1.5, None, path)
    assert err.value.status == "timeout" and "m.gguf" in str(err.value) and "1.5 s" in str(err.value)
    with pytest.raises(BenchError) as err:
        host_run_worker({}, "eqw_segv", 120, None, path)
    assert err.value.status == "crashed" and "SIGSEGV" in str(err.value) and "'pp 1/3'" in str(err.value)
    assert "about to crash" in str(err.value)
    with pytest.raises(BenchError) as err:
        host_run_worker({}, "eqw_sigkill", 120, None, path)
    assert err.value.status == "oom" and "'tg 2/3'" in str(err.value)
    with pytest.raises(BenchError) as err:
        host_run_worker({}, "eqw_error", 120, None, path)
    assert err.value.status == "failed" and str(err.value) == "m.gguf: model file is broken"
    with pytest.raises(BenchError) as err:
        host_run_worker({}, "eqw_exit3", 120, None, path)
    assert err.value.status == "failed" and "status 3: last words" in str(err.value)


def test_the_eval_stops_a_silent_worker_at_its_deadline(workers, tmp_path):
    # in a thread, so that a runner that waits for a line that never comes fails the test instead of hanging it
    outcome: list[BaseException] = []

    def call():
        try:
            call_worker({"path": str(tmp_path / "m.gguf"), "pidfile": str(tmp_path / "p")}, 1.5, lambda p: None,
                         module="eqw_silent")
        except BaseException as exc:   # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the eval's worker was not stopped at its deadline"
    assert len(outcome) == 1 and isinstance(outcome[0], EvalError) and outcome[0].status == "timeout"
    with pytest.raises(EvalError) as err:
        call_worker({"path": "m.gguf"}, 120, lambda p: None, module="eqw_sigkill")
    assert err.value.status == "oom" and type(err.value.status) is str and "SIGKILL" in str(err.value)
    with pytest.raises(EvalError) as err:
        call_worker({"path": "m.gguf"}, 120, lambda p: None, module="eqw_exit3")
    assert err.value.status == "failed" and "last words" in str(err.value)


@pytest.mark.parametrize("code, shell, timed_out, expected", [
    (0, False, False, "ok"),
    (1, False, False, "failed"),
    (-9, False, False, "oom"),          # Popen: killed by SIGKILL
    (-11, False, False, "crashed"),     # SIGSEGV
    (-6, False, False, "crashed"),      # SIGABRT
    (137, True, False, "oom"),          # a shell's $?: 128 + 9
    (139, True, False, "crashed"),      # 128 + 11
    (137, False, False, "failed"),      # a plain exit status 137 is not a signal outside a shell
    (128, True, False, "failed"),
    (2, True, False, "failed"),
    (0, True, True, "timeout"),         # the deadline wins over whatever the exit code says
    (137, True, True, "timeout"),
])
def test_the_one_exit_code_classifier(code, shell, timed_out, expected):
    got = classify_exit(code, timed_out=timed_out, shell=shell)
    assert got == expected and isinstance(got, RungStatus)


def test_statuses_are_the_stored_strings():
    assert [s.value for s in RungStatus] == ["ok", "failed", "crashed", "oom", "timeout", "skipped"]
    assert list(FAILURES) == ["failed", "crashed", "oom", "timeout"]
    assert f"{RungStatus.OOM}" == "oom" and str(RungStatus.CRASHED) == "crashed"
    assert exit_signal(-15) == 15 and exit_signal(143, shell=True) == 15 and exit_signal(143) is None


def test_the_status_module_is_ground_code():
    """edgequant/core/status.py imports nothing of edgequant's: every layer can import it."""
    import ast

    import edgequant.core.status

    tree = ast.parse(Path(edgequant.core.status.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += ["." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names and not [n for n in names if n.split(".")[0] == "edgequant" or n.startswith(".")]

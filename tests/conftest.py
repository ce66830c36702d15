"""Shared pytest fixtures for the edgequant test suite.

Plain fixtures only; add new ones below.  The checkpoint builders live in
``tests/tiny_model.py`` (importable as ``tiny_model`` because pytest puts this
folder on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_model import make_tiny_gemma3

# The ADB device peer (tests/adbpeer/): adb_host_key, adb_peer_factory, adb_peer, adb_cli.
from adbpeer.pytest_fixtures import adb_cli, adb_host_key, adb_peer, adb_peer_factory  # noqa: F401
# A throwaway PostgreSQL server (tests/pgserver.py): pg_server, pg_url.
from pgserver import pg_server, pg_url  # noqa: F401
# The tiny Gemma 3's ONNX rungs and its BF16 GGUF (tests/onnx_fixtures.py), built once per session.
from onnx_fixtures import tiny_bf16_gguf, tiny_onnx  # noqa: F401


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Gemma 3 checkpoint (bf16 safetensors + a real
    SentencePiece tokenizer), built once per test session with seed 0.

    Treat it as read-only: it is shared by every test in the session.
    """
    root = tmp_path_factory.mktemp("tiny_checkpoint")
    return make_tiny_gemma3(root / "tiny-gemma3", seed=0)


# ---------------------------------------------------------------------------
# running the real CLI in a subprocess

import os
import signal
import subprocess
import sys

# Tests share a CPU with each other (fake phones of one farm, runs at once) and with other work: outside
# the tests of contention itself (tests/test_contention*.py, whose profiles set their own threshold), no
# rung is re-measured or stored noisy because of it.
os.environ.setdefault("EDGEQUANT_CONTENTION_THRESHOLD", "1024")
import time

REPO = Path(__file__).resolve().parent.parent


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """An environment whose default cache and database live under ``tmp``."""
    env = dict(os.environ)
    env.update(EDGEQUANT_CACHE_DIR=str(tmp / "cache"), EDGEQUANT_DB=str(tmp / "results.db"),
               COLUMNS="200", TQDM_DISABLE="1")
    env.pop("EDGEQUANT_DEBUG", None)
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgequant.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def start_cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """Start the CLI in its own process group, as a terminal would, so Ctrl-C can be sent to the group."""
    return subprocess.Popen([sys.executable, "-m", "edgequant.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)


def ctrl_c(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    return out, err


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (rc={proc.returncode}) before {what}: {err[-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def assert_one_line_error(result_stderr: str, *needles: str) -> str:
    """A user-facing failure is one line, no traceback; return that line."""
    lines = [ln for ln in result_stderr.splitlines() if ln.strip()]
    assert "Traceback" not in result_stderr, result_stderr
    errors = [ln for ln in lines if ln.startswith("edgequant: error:")]
    assert len(errors) == 1, result_stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def db_rows(db: Path, sql: str, *args) -> list[dict]:
    """Rows of a results database, read with plain sqlite3 (not edgequant's store)."""
    import sqlite3

    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


@pytest.fixture(scope="session")
def imatrix_tool() -> Path:
    """llama.cpp's llama-imatrix, built once from the vendored source into the normal edgequant cache
    (the host build tree the host runner shares), so only the first session on a machine pays for it."""
    from edgequant.bench.llamacpp_tools import build_llama_tool

    return build_llama_tool("llama-imatrix", on_progress=lambda m: print(m, file=sys.stderr))


# ---------------------------------------------------------------------------
# on-device runners and the "phone" (the ADB peer running the linux-arm64 runner under qemu): shared here, so
# the session fixtures are set up once per session, not once per test module that imports them


@pytest.fixture(scope="session")
def arm64_runner():
    """llama.cpp's tools built for linux-arm64 (static; run under qemu-aarch64-static), cached by revision."""
    from edgequant.bench.runner import build_runner

    return build_runner("linux-arm64", on_progress=lambda m: print(m, file=sys.stderr))


@pytest.fixture(scope="session")
def host_runner():
    """llama.cpp's tools built for this host, cached by revision."""
    from edgequant.bench.runner import build_runner

    return build_runner("host", on_progress=lambda m: print(m, file=sys.stderr))


def phone_profile_text(name: str = "phone-tiny", types: tuple[str, ...] = ("Q8_0", "Q4_0"), *,
                       description: str | None = None, onnx: tuple[str, ...] = (), **bench) -> str:
    """The TOML of a profile for the phone tests: the tiny model's BF16 reference and ``types`` (GGUF rungs),
    ``onnx`` (ONNX variants), small llama-bench tests (2 threads, 16 prompt and 4 generated tokens, 3
    repetitions, no warm-up; ``bench`` overrides or adds ``[bench]`` keys, e.g. ``contention_threshold``)
    and no cool-down wait."""
    import json

    settings = {"threads": 2, "n_prompt": 16, "n_gen": 4, "repetitions": 3, "warmup": 0, "timeout": 600, **bench}
    text = f"[profile]\nname = {json.dumps(name)}\n"
    if description is not None:
        text += f"description = {json.dumps(description)}\n"
    text += f"\n[quantize]\nreference = \"BF16\"\ntypes = {json.dumps(list(types))}\n"
    if onnx:
        text += f"\n[onnx]\nvariants = {json.dumps(list(onnx))}\n"
    text += "\n[bench]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    return text + "\n[device]\ncooldown_max_wait = 0\n"


PHONE_PROFILE = phone_profile_text(description="three rungs of the tiny model, small llama-bench tests")


@pytest.fixture
def phone_env(adb_host_key, tmp_path, monkeypatch) -> dict[str, str]:
    """A CLI environment (``cli_env``) that reaches the test's ADB peers with the test's adb key and names no
    phone or device folder of its own; this process's own transports use the same key."""
    env = cli_env(tmp_path, ANDROID_USER_HOME=str(adb_host_key.home / ".android"), HOME=str(adb_host_key.home))
    for name in ("EDGEQUANT_DEVICES", "EDGEQUANT_DEVICE_DIR", "ADB_VENDOR_KEYS"):
        env.pop(name, None)
    monkeypatch.setenv("ANDROID_USER_HOME", env["ANDROID_USER_HOME"])  # this process's own transports
    return env


@pytest.fixture
def phone(request, adb_peer_factory, phone_env, tmp_path):
    """A "phone": the ADB peer as an ARMv8.0 Cortex-A53 under qemu; (peer, its work dir, a CLI env
    (``phone_env``), a profile of three small rungs (``PHONE_PROFILE``; a module wanting other rungs or
    settings writes ``phone_profile_text(...)`` beside it)).  ``@pytest.mark.parametrize("phone", [...],
    indirect=True)`` picks the daemon personality (default "classic")."""
    peer = adb_peer_factory(qemu_cpu="cortex-a53", personality=getattr(request, "param", "classic"))
    assert peer.qemu_enabled, "qemu-aarch64-static is needed: make test installs qemu-user-static (.ci/system-deps)"
    workdir = str(peer.sandbox / "eq")
    profile = tmp_path / "phone.toml"
    profile.write_text(PHONE_PROFILE)
    return peer, workdir, phone_env, profile

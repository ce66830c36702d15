"""ONNX rungs in the commands: `edgequant run --device SERIAL --onnx-perf-test TOOL` measures them on the
"phone" (the ADB device peer on loopback, the real linux-arm64 llama-bench under qemu for the GGUF rung,
and the stand-in onnxruntime_perf_test for the ONNX rung: it honours the real tool's command line but is
not the tool; phone figures need onnxruntime_perf_test built for Android), without the option they are
stored as skipped with the reason, a bad tool is one line; `edgequant bench` and `edgequant eval` take the
profile's ONNX rungs like `run` does on the host."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error, cli_env, db_rows, run_cli
from onnx_fixtures import tiny_onnx  # noqa: F401 - fixture
from test_device_run import phone  # noqa: F401 - fixture: the peer "phone", its work dir, env and profile
from test_quality import write_suite
from test_runner import arm64_runner  # noqa: F401 - the session fixture that builds the linux-arm64 runner

STANDIN = Path(__file__).with_name("onnx_perf_standin.py")

# the BF16 reference (the one GGUF rung) and one ONNX variant; small tests
PROFILE = """
[profile]
name = "phone-onnx"

[quantize]
reference = "BF16"
types = []

[onnx]
variants = ["int4"]

[bench]
threads = 1
n_prompt = 16
n_gen = 4
repetitions = 3
warmup = 0
timeout = 600

[device]
cooldown_max_wait = 0
"""


def _standin(folder: Path) -> Path:
    """The stand-in as an executable named like the real tool (a `#!` script run by this Python)."""
    tool = folder / "onnxruntime_perf_test"
    tool.write_text(f"#!{sys.executable}\n" + STANDIN.read_text())
    tool.chmod(0o755)
    return tool


def _run_args(tiny_checkpoint, peer, workdir, profile, runner, cache, *extra):
    return ["run", "--model", str(tiny_checkpoint), "--profile", str(profile), "--device", peer.serial,
            "--device-dir", workdir, "--runner-dir", str(runner.path), "--no-quality", "--cache-dir", str(cache),
            *extra]


def _statuses(db: Path) -> dict[tuple[str, str], tuple[str, str | None]]:
    return {(r["quant"], r["device_id"]): (r["status"], r["detail"])
            for r in db_rows(db, "SELECT quant, device_id, status, detail FROM rung_status")}


def _rows(db: Path, quant: str) -> dict[str, dict]:
    return {r["metric"]: r for r in db_rows(db, "SELECT * FROM measurements WHERE quant = ?", quant)}


@pytest.fixture
def onnx_phone(phone, tmp_path):
    peer, workdir, env, _ = phone
    profile = tmp_path / "phone-onnx.toml"
    profile.write_text(PROFILE)
    return peer, workdir, env, profile


def test_run_on_a_phone_measures_the_onnx_rung_with_perf_test(tiny_checkpoint, tiny_onnx, onnx_phone, arm64_runner,
                                                              tmp_path):
    _, _, cache = tiny_onnx
    peer, workdir, env, profile = onnx_phone
    tool = _standin(tmp_path)
    res = run_cli(*_run_args(tiny_checkpoint, peer, workdir, profile, arm64_runner, cache,
                             "--onnx-perf-test", str(tool)), env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    db = Path(env["EDGEQUANT_DB"])
    device_id = f"adb:{peer.serial}"
    assert _statuses(db) == {("BF16", device_id): ("ok", None), ("ONNX-INT4", device_id): ("ok", None)}
    onnx = _rows(db, "ONNX-INT4")
    assert {r["device_id"] for r in onnx.values()} == {device_id}
    assert {r["runtime"] for r in onnx.values()} == {"onnxruntime"}
    params = json.loads(onnx["pp_tps"]["params"])
    assert params["runner"] == "device" and params["tool"] == "onnxruntime_perf_test" and params["threads"] == 1
    # the figures are the tool's own latencies on the device: prefill t/s = 16 / latency, decode = 1 / latency
    runs = {p.parent.parent.name: [float(line.split(",")[1]) for line in p.read_text().splitlines()]
            for p in (Path(workdir) / "runs" / "onnx").glob("*/*/run/perf_result.csv")}
    assert set(runs) == {"prefill", "decode"} and all(len(v) == 3 for v in runs.values())
    assert onnx["pp_tps"]["value"] == pytest.approx(sum(16 / s for s in runs["prefill"]) / 3)
    assert onnx["tg_tps"]["value"] == pytest.approx(sum(1 / s for s in runs["decode"]) / 3)
    assert onnx["pp_tps"]["repetitions"] == onnx["tg_tps"]["repetitions"] == 3
    assert onnx["load_time"]["value"] > 0 and onnx["peak_rss"]["value"] > 0
    # the GGUF rung beside it, measured by llama-bench on the same phone
    gguf = _rows(db, "BF16")
    assert {r["device_id"] for r in gguf.values()} == {device_id} and gguf["tg_tps"]["value"] > 0
    # the tool was installed in the work directory, executable, with the host file's bytes
    installed = Path(workdir) / "bin" / "onnxruntime_perf_test"
    assert installed.read_bytes() == tool.read_bytes() and installed.stat().st_mode & 0o111
    assert not list(Path(workdir).rglob("*.partial"))
    assert "ONNX-INT4" in res.stdout


def test_without_perf_test_the_onnx_rung_on_a_phone_is_stored_as_skipped(tiny_checkpoint, tiny_onnx, onnx_phone,
                                                                        arm64_runner):
    _, _, cache = tiny_onnx
    peer, workdir, env, profile = onnx_phone
    res = run_cli(*_run_args(tiny_checkpoint, peer, workdir, profile, arm64_runner, cache), env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]          # a skipped rung is not a failure
    db = Path(env["EDGEQUANT_DB"])
    device_id = f"adb:{peer.serial}"
    statuses = _statuses(db)
    assert statuses[("BF16", device_id)] == ("ok", None)
    status, detail = statuses[("ONNX-INT4", device_id)]
    assert status == "skipped" and "--onnx-perf-test" in detail and "onnxruntime_perf_test" in detail
    # the row is there (size, bits per weight), with the phone's id, but no speed figures
    onnx = _rows(db, "ONNX-INT4")
    assert {r["device_id"] for r in onnx.values()} == {device_id} and "size" in onnx and "tg_tps" not in onnx
    # the run's summary says why
    assert "ONNX-INT4" in res.stderr and "--onnx-perf-test" in res.stderr
    assert not (Path(workdir) / "bin" / "onnxruntime_perf_test").exists()
    assert not (Path(workdir) / "runs" / "onnx").exists()


def test_a_bad_perf_test_is_one_line_and_nothing_is_stored(tiny_checkpoint, onnx_phone, arm64_runner, tmp_path):
    peer, workdir, env, profile = onnx_phone
    args = ["run", "--model", str(tiny_checkpoint), "--profile", str(profile), "--device", peer.serial,
            "--device-dir", workdir, "--runner-dir", str(arm64_runner.path), "--no-quality"]
    missing = tmp_path / "nowhere" / "onnxruntime_perf_test"
    plain = tmp_path / "plain"
    plain.write_bytes(b"\x7fELF" + b"\0" * 8)
    plain.chmod(0o644)
    host_binary = tmp_path / "host" / "onnxruntime_perf_test"      # a real x86-64 executable
    host_binary.parent.mkdir()
    shutil.copy(Path(sys.executable).resolve(), host_binary)
    for tool, needles in ((missing, ("no such file", "--android")), (plain, ("not executable",)),
                          (host_binary, ("x86-64", "aarch64", "arm64-v8a"))):
        res = run_cli(*args, "--onnx-perf-test", str(tool), env=env, timeout=300)
        assert res.returncode == 2, res.stderr[-2000:]
        assert_one_line_error(res.stderr, "--onnx-perf-test", str(tool), *needles)
    # an aarch64 program linked against glibc cannot start on an Android phone: refused before the run starts
    # (the linux-arm64 runner the other device tests use needs the same cross compiler: .ci/run installs it)
    cc = shutil.which("aarch64-linux-gnu-gcc")
    assert cc is not None, "aarch64-linux-gnu-gcc is needed (apt-get install gcc-aarch64-linux-gnu)"
    src = tmp_path / "t.c"
    src.write_text("int main(void) { return 0; }\n")
    glibc = tmp_path / "glibc" / "onnxruntime_perf_test"
    glibc.parent.mkdir()
    subprocess.run([cc, "-o", str(glibc), str(src)], check=True, capture_output=True, timeout=120)
    res = run_cli(*args, "--onnx-perf-test", str(glibc.parent), env=env, timeout=600)
    assert res.returncode == 2, res.stderr[-2000:]
    assert_one_line_error(res.stderr, "linked for linux", f"device {peer.serial}", "android")
    assert not (Path(workdir) / "bin" / "onnxruntime_perf_test").exists()
    db = Path(env["EDGEQUANT_DB"])
    assert not db.exists() or not db_rows(db, "SELECT * FROM runs")


# ---------------------------------------------------------------------------
# bench and eval on the host

HOST_PROFILE = ('[profile]\nname = "host-onnx"\n[quantize]\ntypes = []\n[onnx]\nvariants = ["int4"]\n'
                '[bench]\nn_prompt = 16\nn_gen = 4\nrepetitions = 3\nthreads = 1\n')


def test_bench_measures_the_profiles_onnx_rungs_and_refuses_unbuilt_ones(tiny_checkpoint, tiny_onnx, tmp_path):
    _, _, cache = tiny_onnx
    env = cli_env(tmp_path)
    prof = tmp_path / "p.toml"
    prof.write_text(HOST_PROFILE)
    built = run_cli("quantize", "--model", str(tiny_checkpoint), "--profile", str(prof), "--cache-dir", str(cache),
                    env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    res = run_cli("bench", "--model", str(tiny_checkpoint), "--profile", str(prof), "--cache-dir", str(cache),
                  env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    db = tmp_path / "results.db"
    onnx, gguf = _rows(db, "ONNX-INT4"), _rows(db, "BF16")
    assert {r["runtime"] for r in onnx.values()} == {"onnxruntime"}
    assert {r["device_id"] for r in onnx.values()} == {r["device_id"] for r in gguf.values()}   # the host
    for metric in ("pp_tps", "tg_tps"):
        assert onnx[metric]["value"] > 0 and onnx[metric]["repetitions"] == 3
    assert json.loads(onnx["tg_tps"]["params"])["execution_provider"] == "CPUExecutionProvider"
    assert "ONNX-INT4" in res.stdout
    # a variant that was never built: one line naming it, before a run is stored
    runs_before = len(db_rows(db, "SELECT * FROM runs"))
    other = tmp_path / "other.toml"
    other.write_text(HOST_PROFILE.replace('variants = ["int4"]', 'variants = ["int4-b128"]\n'
                                          '[onnx.int4-b128]\nkind = "int4"\nblock_size = 128'))
    res = run_cli("bench", "--model", str(tiny_checkpoint), "--profile", str(other), "--cache-dir", str(cache),
                  env=env)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "ONNX-INT4-B128", "edgequant quantize")
    assert len(db_rows(db, "SELECT * FROM runs")) == runs_before


def test_eval_judges_the_profiles_onnx_rungs_against_the_gguf_reference(tiny_checkpoint, tiny_onnx, tmp_path):
    _, _, cache = tiny_onnx
    env = cli_env(tmp_path)
    prof = tmp_path / "p.toml"
    prof.write_text(HOST_PROFILE)
    suite = write_suite(tmp_path)
    res = run_cli("eval", "--model", str(tiny_checkpoint), "--profile", str(prof), "--suite", str(suite),
                  "-t", "1", "--cache-dir", str(cache), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    db = tmp_path / "results.db"
    onnx = _rows(db, "ONNX-INT4")
    assert {r["runtime"] for r in onnx.values()} == {"onnxruntime"}
    for metric in ("xml_parse_rate", "mean_kld", "top1_agreement"):
        assert metric in onnx, metric
    assert json.loads(onnx["mean_kld"]["params"])["reference"] == "BF16"
    assert 0 <= onnx["top1_agreement"]["value"] <= 1 and onnx["mean_kld"]["value"] >= 0
    cases = db_rows(db, "SELECT DISTINCT quant FROM eval_cases")
    assert {c["quant"] for c in cases} == {"BF16", "ONNX-INT4"}

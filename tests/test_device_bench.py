"""The device benchmark's plumbing without a runner: the measuring shell on real shells
(dash, mksh as on Android, busybox ash), real `time -v` reports, /proc status, and the
parsers fed garbage.  The runner itself is exercised end to end in test_runner.py."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgequant.bench.device_bench import failure, llama_bench_args, parse_llama_bench_json, parse_load_ms
from edgequant.devices.facts import CPU_TOPOLOGY_COMMAND, parse_cpu_topology
from edgequant.devices.measured import (DeviceOutputError, measured_command, parse_proc_status, parse_status_line,
                                        parse_time_report, run_measured)
from edgequant.core.errors import BenchError
from edgequant.devices.transport import DeviceError, ShellResult
from edgequant.profiles import BenchSettings

SHELLS = {"dash": ["/bin/sh"], "mksh": ["mksh"], "busybox-ash": ["busybox", "sh"]}
TIMES = {"toybox": ("toybox", "time", "-v"), "gnu": ("/usr/bin/time", "-v"), "busybox": ("busybox", "time", "-v")}
MIB = 1024 * 1024


class LocalShell:
    """Our Transport interface, served by a shell on this machine (a fake of our own interface)."""

    kind = "local"

    def __init__(self, sh: list[str]):
        self.sh = sh
        self.serial = "local:" + " ".join(sh)
        self.commands: list[str] = []

    def shell(self, command: str, timeout: float) -> ShellResult:
        self.commands.append(command)
        proc = subprocess.Popen([*self.sh, "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise DeviceError("timeout", f"{command[:60]} did not finish within {timeout} s") from None
        return ShellResult(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def push(self, local, remote, on_progress=None, timeout=None):
        shutil.copyfile(local, remote)

    def pull(self, remote, local, timeout=None):
        shutil.copyfile(remote, local)

    def close(self):
        pass


def _alloc(mib: int, seconds: float = 0.6) -> list[str]:
    """A real program that holds ``mib`` MiB of touched anonymous memory for a moment."""
    return [sys.executable, "-c",
            f"import time; b = bytearray({mib} * 1024 * 1024); time.sleep({seconds}); print(len(b))"]


# ---------------------------------------------------------------------------
# time -v and /proc/<pid>/status, from real programs


@pytest.mark.parametrize("tool", TIMES)
def test_time_report_of_a_real_program_gives_its_peak_rss(tool):
    proc = subprocess.run([*TIMES[tool], *_alloc(120, 0.1)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = parse_time_report(proc.stderr)
    # 120 MiB touched + the interpreter (tens of MiB), no more
    assert 120 * 1024 <= report.max_rss_kib <= 120 * 1024 + 120 * 1024


@pytest.mark.parametrize("tool", ["toybox", "busybox"])
def test_time_report_keeps_the_real_figure_after_other_output(tool):
    noisy = "Max RSS (KiB) of something else: 7\nwarning: blah\n"
    proc = subprocess.run([*TIMES[tool], *_alloc(40, 0.1)], capture_output=True, text=True, timeout=120)
    report = parse_time_report(noisy + proc.stderr.replace("\n", "\r\n"))
    assert report.max_rss_kib >= 40 * 1024


def test_proc_status_parse_matches_the_kernels_own_counters():
    keep = bytearray(64 * MIB)  # noqa: F841 - resident while we look
    ru_maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fields = parse_proc_status(Path("/proc/self/status").read_text())
    assert set(fields) == {"VmHWM", "VmRSS", "RssAnon", "RssFile"}
    assert fields["VmHWM"] >= ru_maxrss_kib * 1024 >= 64 * MIB  # the same high-water mark, read later
    assert fields["RssAnon"] >= 64 * MIB
    assert fields["RssAnon"] + fields["RssFile"] <= fields["VmRSS"]


@pytest.mark.parametrize("garbage", [
    "", "\x00\x01\x02binary", "VmHWM: lots kB", "VmHWM: -5 kB\nRssAnon: 1 MB", "RssAnon:\t99999999999999999999 kB",
])
def test_proc_status_garbage_is_a_clear_error(garbage):
    with pytest.raises(DeviceOutputError, match="status"):
        parse_proc_status(garbage)


def test_proc_status_refuses_huge_input():
    with pytest.raises(DeviceOutputError, match="more than"):
        parse_proc_status("VmHWM:\t1 kB\n" * 100_000)


@pytest.mark.parametrize("garbage", ["", "sh: toybox: not found\n", "Max RSS (KiB): many\n",
                                     "Max RSS (KiB): 99999999999999\n", "\ufffd" * 100])
def test_time_report_garbage_is_a_clear_error(garbage):
    with pytest.raises(DeviceOutputError, match="Max RSS"):
        parse_time_report(garbage)


@pytest.mark.parametrize("garbage", ["", "rc=0", "rc=x timedout=0 polls=1 vmhwm_kb=1 rss_anon_kb=1 rss_file_kb=1",
                                     "rc=-1 timedout=0 polls=1 vmhwm_kb=1 rss_anon_kb=1 rss_file_kb=1", "x" * 5000])
def test_status_line_garbage_is_a_clear_error(garbage):
    with pytest.raises(DeviceOutputError):
        parse_status_line(garbage)


def test_load_time_line():
    log = ("llama_model_loader: - kv 0: general.architecture str = gemma3\n"
           "common_perf_print:        load time =      12.34 ms\n"
           "common_perf_print: prompt eval time =       0.00 ms /     1 tokens\n")
    assert parse_load_ms(log) == pytest.approx(12.34)
    with pytest.raises(DeviceOutputError, match="load time"):
        parse_load_ms("no timings here\n")


# ---------------------------------------------------------------------------
# llama-bench JSON from a device: anything that is not what llama-bench writes is refused


def _test_obj(**over):
    obj = {"build_commit": "abc", "cpu_info": "ARMv8", "model_size": 1000, "model_n_params": 10, "n_threads": 4,
           "n_prompt": 8, "n_gen": 0, "avg_ts": 100.0, "stddev_ts": 1.0, "samples_ns": [80_000_000, 80_000_000],
           "samples_ts": [100.0, 100.0]}
    obj.update(over)
    return obj


def test_llama_bench_json_tokens_per_second_come_from_the_samples():
    text = json.dumps([_test_obj(samples_ns=[80_000_000, 160_000_000]),
                       _test_obj(n_prompt=0, n_gen=4, samples_ns=[40_000_000, 50_000_000, 20_000_000])])
    tests = parse_llama_bench_json(text)
    assert set(tests) == {"pp", "tg"}
    assert tests["pp"].tokens_per_second().samples == (100.0, 50.0)     # 8 tokens in 80 ms, 160 ms
    assert tests["tg"].tokens_per_second().samples == (100.0, 80.0, 200.0)
    assert tests["pp"].info["cpu_info"] == "ARMv8"


@pytest.mark.parametrize("text,needle", [
    ("", "no JSON"),
    ("[\n  {\n    \"build_commit\": \"abc\",\n", "not valid JSON"),          # killed while writing
    ("{}", "non-empty JSON list"),
    ("[]", "non-empty JSON list"),
    ("[1]", "not a JSON object"),
    (json.dumps([_test_obj(samples_ns=[])]), "samples_ns"),
    (json.dumps([_test_obj(samples_ns=[1, -2])]), "samples_ns"),
    (json.dumps([_test_obj(samples_ns=["1"])]), "samples_ns"),
    (json.dumps([_test_obj(n_prompt=True)]), "n_prompt"),
    (json.dumps([_test_obj(n_threads=0)]), "n_threads"),
    (json.dumps([_test_obj(n_prompt=0, n_gen=0)]), "neither"),
    (json.dumps([_test_obj(), _test_obj()]), "two pp tests"),
    (json.dumps([_test_obj(avg_ts=float("nan"))]), "avg_ts"),
    ("[" + ",".join([json.dumps(_test_obj())] * 20000) + "]", "more than"),
])
def test_llama_bench_json_garbage_is_a_clear_error(text, needle):
    with pytest.raises(DeviceOutputError, match=needle):
        parse_llama_bench_json(text)


# ---------------------------------------------------------------------------
# the command line


def test_llama_bench_args_follow_the_settings():
    s = BenchSettings(n_prompt=64, n_gen=16, repetitions=4, warmup=0, n_batch=256, n_ubatch=128, flash_attn="off",
                      mmap=False)
    args = llama_bench_args("/data/local/tmp/m.gguf", s, 6, repack=False)
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["-m"] == "/data/local/tmp/m.gguf"
    assert (pairs["-p"], pairs["-n"], pairs["-t"], pairs["-r"]) == ("64", "16", "6", "4")
    assert (pairs["-b"], pairs["-ub"], pairs["-fa"], pairs["-lm"]) == ("256", "128", "off", "none")
    assert args[args.index("--repack") + 1] == "0"
    assert "--no-warmup" in args and args[-2:] == ["-o", "json"]
    default = llama_bench_args("m.gguf", BenchSettings(), 4, repack=None)
    assert "--repack" not in default and "--no-warmup" not in default


@pytest.mark.parametrize("shell", SHELLS)
def test_hostile_arguments_reach_the_program_verbatim(shell, tmp_path):
    marker = tmp_path / "pwned"
    nasty = ["it's", 'a "b"', "$(touch " + str(marker) + ")", "`touch " + str(marker) + "`", "x; touch " + str(marker),
             "line\nbreak", "*", "$HOME", ""]
    workdir = tmp_path / "work dir; 'quoted'"
    argv = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *nasty]
    run = run_measured(LocalShell(SHELLS[shell]), argv, str(workdir), time_cmd=TIMES["toybox"], deadline_s=60)
    assert failure(run, "argv dump") is None, run.stderr_tail
    assert json.loads(run.stdout) == nasty
    assert not marker.exists()


# ---------------------------------------------------------------------------
# the measuring shell on every shell a device may have: outcomes and memory of real programs


@pytest.mark.parametrize("shell", SHELLS)
def test_measured_run_reports_memory_and_success(shell, tmp_path):
    run = run_measured(LocalShell(SHELLS[shell]), _alloc(150), str(tmp_path / "w"), time_cmd=TIMES["toybox"],
                       poll_interval=0.05, deadline_s=60)
    assert failure(run, "alloc") is None and run.exit_code == 0
    assert run.stdout.strip() == str(150 * MIB)
    assert run.polls >= 3
    assert 150 * 1024 <= run.rss_anon_kib <= run.vmhwm_kib
    assert 150 * 1024 <= run.max_rss_kib <= 150 * 1024 + 120 * 1024
    assert run.rss_file_kib > 0  # the interpreter's mapped files


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("argv,status,needle", [
    (["sh", "-c", "echo 'error: no such model' >&2; exit 3"], "failed", "status 3: error: no such model"),
    (["sh", "-c", "kill -KILL $$"], "oom", "SIGKILL"),
    (["sh", "-c", "echo about to crash >&2; kill -SEGV $$"], "crashed", "SIGSEGV: about to crash"),
    (["sh", "-c", "kill -ILL $$"], "crashed", "older baseline"),
])
def test_measured_run_outcomes(shell, argv, status, needle, tmp_path):
    run = run_measured(LocalShell(SHELLS[shell]), argv, str(tmp_path), time_cmd=TIMES["toybox"], deadline_s=60)
    err = failure(run, "prog")
    assert err is not None and err.status == status
    assert needle in str(err) and "\n" not in str(err)


@pytest.mark.parametrize("shell", SHELLS)
def test_measured_run_stops_a_program_at_the_deadline(shell, tmp_path):
    pidfile = tmp_path / "pid"
    argv = ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"]
    run = run_measured(LocalShell(SHELLS[shell]), argv, str(tmp_path), time_cmd=TIMES["toybox"],
                       poll_interval=0.1, deadline_s=1.0)
    err = failure(run, "sleeper")
    assert err is not None and err.status == "timeout"
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_without_a_time_command_the_peak_comes_from_the_poller(tmp_path):
    run = run_measured(LocalShell(SHELLS["mksh"]), _alloc(100), str(tmp_path), time_cmd=(), deadline_s=60)
    assert run.max_rss_kib is None and run.peak_rss_kib == run.vmhwm_kib >= 100 * 1024


def test_a_missing_time_command_is_one_clear_error(tmp_path):
    with pytest.raises(DeviceError) as info:
        run_measured(LocalShell(SHELLS["dash"]), ["true"], str(tmp_path), time_cmd=("no-such-time-tool", "-v"),
                     deadline_s=10)
    assert info.value.kind == "io" and "no-such-time-tool" in str(info.value)


def test_measured_command_quotes_the_environment(tmp_path):
    cmd = measured_command(["env"], str(tmp_path), env={"LD_LIBRARY_PATH": "/x y/$(lib)", "bad name": "z"},
                           time_cmd=())
    assert "LD_LIBRARY_PATH='/x y/$(lib)'" in cmd and "bad name" not in cmd
    run = run_measured(LocalShell(SHELLS["dash"]), ["env"], str(tmp_path), env={"LD_LIBRARY_PATH": "/x y/$(lib)"},
                       time_cmd=(), deadline_s=10)
    assert "LD_LIBRARY_PATH=/x y/$(lib)" in run.stdout.splitlines()


# ---------------------------------------------------------------------------
# big cores


@pytest.mark.parametrize("text,expected", [
    # 1 prime + 3 big + 4 little (e.g. Snapdragon 8 Gen 1): everything but the little cluster
    ("policy 0 1 2 3 : 1785600\npolicy 4 5 6 : 2496000\npolicy 7 : 2995200\nonline 0-7\n", 4),
    ("policy 0 1 2 3 : 1800000\npolicy 4 5 6 7 : 2400000\nonline 0-7\n", 4),
    ("policy 0 1 2 3 4 5 6 7 : 2000000\nonline 0-7\n", 8),                  # one cluster: all of them
    ("policy 0 1 2 3 : 1800000\npolicy 4 5 6 7 : 2400000\nonline 0-5\n", 2),  # big cores 6, 7 offline
    ("online 0-1\n", 2),                                                     # no cpufreq (VMs)
    ("online 0,2-3\r\n", 3),
])
def test_big_cores(text, expected):
    assert parse_cpu_topology(text) == expected


@pytest.mark.parametrize("garbage", ["", "online \n", "policy x : y\n", "\x00" * 10])
def test_big_cores_garbage_is_a_clear_error(garbage):
    with pytest.raises(DeviceOutputError, match="CPUs"):
        parse_cpu_topology(garbage)


def test_big_cores_of_this_machine_through_a_shell():
    out = LocalShell(SHELLS["mksh"]).shell(CPU_TOPOLOGY_COMMAND, 30).stdout
    online = Path("/sys/devices/system/cpu/online").read_text().strip()
    assert f"online {online}" in out
    assert 1 <= parse_cpu_topology(out) <= os.cpu_count()


def test_a_device_that_never_answers_is_a_timeout(tmp_path):
    class Hung(LocalShell):
        def shell(self, command, timeout):
            if "bench.out" in command:  # the measuring command; the device never answers
                raise DeviceError("timeout", f"no answer within {timeout:g} s")
            return super().shell(command, timeout)

    with pytest.raises(BenchError) as info:
        run_measured(Hung(SHELLS["dash"]), ["true"], str(tmp_path), deadline_s=5)
    assert info.value.status == "timeout" and "may be hung: no answer within 66.25 s" in str(info.value)


def test_other_device_errors_pass_through(tmp_path):
    class Gone(LocalShell):
        def shell(self, command, timeout):
            raise DeviceError("offline", "device R3CN is offline; reconnect it")

    with pytest.raises(DeviceError) as info:
        run_measured(Gone(SHELLS["dash"]), ["true"], str(tmp_path), deadline_s=5)
    assert info.value.kind == "offline"


# ---------------------------------------------------------------------------
# depths, cache types and energy (issue 18)


def test_llama_bench_args_carry_depths_and_a_quantized_cache_with_flash_attention():
    s = BenchSettings(n_prompt=64, n_gen=16, flash_attn="auto")
    args = llama_bench_args("m.gguf", s, 4, repack=None, depths=(0, 512), cache_type="q4_0")
    pairs = dict(zip(args[::2], args[1::2]))
    assert (pairs["-d"], pairs["-ctk"], pairs["-ctv"], pairs["-fa"]) == ("0,512", "q4_0", "q4_0", "on")
    plain = llama_bench_args("m.gguf", s, 4, repack=None)
    assert "-d" not in plain and "-ctk" not in plain and dict(zip(plain[::2], plain[1::2]))["-fa"] == "auto"
    bf16 = dict(zip(*(lambda a: (a[::2], a[1::2]))(llama_bench_args("m.gguf", s, 4, None, cache_type="bf16"))))
    assert bf16["-ctk"] == "bf16" and bf16["-fa"] == "auto"       # not quantized: no flash attention needed


def test_llama_bench_json_with_depths_keeps_one_test_per_kind_and_depth():
    from edgequant.bench.device_bench import parse_llama_bench_tests

    text = json.dumps([_test_obj(n_depth=0), _test_obj(n_depth=512),
                       _test_obj(n_prompt=0, n_gen=4, n_depth=0), _test_obj(n_prompt=0, n_gen=4, n_depth=512)])
    tests = parse_llama_bench_tests(text)
    assert [(t.kind, t.n_depth) for t in tests] == [("pp", 0), ("pp", 512), ("tg", 0), ("tg", 512)]
    with pytest.raises(DeviceOutputError, match="two pp tests at depth 512"):
        parse_llama_bench_tests(json.dumps([_test_obj(n_depth=512), _test_obj(n_depth=512)]))


@pytest.mark.parametrize("shell", SHELLS)
def test_the_battery_is_sampled_while_the_program_runs(shell, tmp_path):
    supply = tmp_path / "power supply"
    supply.mkdir()
    (supply / "current_now").write_text("-1250000\n")     # 1.25 A discharging
    (supply / "voltage_now").write_text("4000000\n")      # 4.0 V
    run = run_measured(LocalShell(SHELLS[shell]), ["sleep", "1"], str(tmp_path / "w"), time_cmd=TIMES["toybox"],
                       deadline_s=60, power_dir=str(supply))
    assert failure(run, "sleep") is None
    assert 3 <= len(run.power) <= 8                       # every 0.2 s for about a second
    assert all(w == pytest.approx(5.0) for _, w in run.power)
    times = [t for t, _ in run.power]
    assert times == sorted(times) and 0.6 <= times[-1] - times[0] <= 1.6
    assert (tmp_path / "w" / "power.stop").exists()      # the sampler was stopped when the program ended
    missing = run_measured(LocalShell(SHELLS[shell]), ["true"], str(tmp_path / "w2"), time_cmd=TIMES["toybox"],
                           deadline_s=60, power_dir=str(tmp_path / "no such folder"))
    assert failure(missing, "true") is None and missing.power == []

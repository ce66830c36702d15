"""Build llama.cpp's own command-line tools from the revision edgequant runs in-process.

llama-cpp-python ships as an sdist that vendors the whole llama.cpp tree
(``vendor/llama.cpp``).  Building ``llama-bench``, ``llama-perplexity`` and
friends from the sdist of the *installed* version keeps their numbers comparable
with what edgequant measures through the bindings: same kernels, same defaults.

Layout of the cache (under ``edgequant.core.paths.cache_dir()``)::

    tools/llama.cpp-<version>/
        src/                        the unpacked sdist (llama_cpp_python-<version>/...)
        builds/<label>-<key>/       one CMake build tree per (label, configure arguments);
                                    binaries and shared libraries in bin/
        builds/<label>-<key>.log    the log of the last build in that tree
        toolchains/                 CMake toolchain files written by edgequant
        runners/                    finished device runners (``edgequant.bench.runner``)

This module holds the one implementation of "configure and build some CMake
targets of the vendored tree"; ``build_llama_tool`` uses it for host tools and
``edgequant.bench.runner`` for device runners.  Every step is idempotent and
skipped when its output exists; the source is unpacked under a temporary name
and renamed when complete, and a lock file per build tree serializes
concurrent builds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Iterator

from edgequant.core.errors import BadInput, RunFailed
from edgequant.core.paths import cache_dir

DIST_NAME = "llama-cpp-python"

# The configuration every build starts from: CPU only, no network (no OpenSSL), no
# server, tests or examples.  The install RPATH is used in the build tree too, so a
# binary finds its shared libraries both beside it (the build tree's bin/) and in a
# runner's lib/ after it is copied there.
CMAKE_CONFIGURE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN;$ORIGIN/../lib",
)

# -DNAME=VALUE or -DNAME:TYPE=VALUE
_DEFINE = re.compile(r"^-D([A-Za-z_][A-Za-z0-9_.+-]*)(:[A-Z]+)?=(.*)$", re.S)

Say = Callable[[str], None]


def installed_version() -> str:
    """The version of the installed llama-cpp-python distribution."""
    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        raise RunFailed(f"{DIST_NAME} is not installed; install edgequant's dependencies "
                        f"(pip install -e .)") from None


def tools_root(version: str | None = None, cache_root: Path | None = None) -> Path:
    """The cache folder for one llama.cpp revision, named after the bindings' version."""
    return (cache_root or cache_dir()) / "tools" / f"llama.cpp-{version or installed_version()}"


@contextmanager
def locked(folder: Path, name: str = "") -> Iterator[None]:
    """An exclusive lock on ``folder/.<name>.lock`` (``.lock`` when no name)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / (f".{name}.lock" if name else ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], log: Path, what: str, cwd: Path | None = None) -> None:
    """Run ``cmd``, appending its output to ``log``; fail with the log's tail."""
    with open(log, "a", encoding="utf-8", errors="replace") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            proc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, check=False)
        except FileNotFoundError:
            raise RunFailed(f"{what}: '{cmd[0]}' not found; install it and retry") from None
    if proc.returncode != 0:
        raise RunFailed(f"{what} failed (exit {proc.returncode}): {_cause(log)} (full log: {log})")


_ERROR_LINE = re.compile(r"\b(?:fatal error|error):|CMake Error", re.I)


def _cause(log: Path) -> str:
    """The first compiler/CMake error line of the log (make's own "*** Error" lines only repeat it),
    else its last line."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if _ERROR_LINE.search(line) and "***" not in line:
            if line.startswith("CMake Error") and line.endswith(":") and i + 1 < len(lines):
                line = f"{line} {lines[i + 1]}"  # CMake puts the message on the next line
            return line[:400]
    return lines[-1][:400] if lines else ""


def llama_cpp_source(version: str | None = None, log: Path | None = None,
                     cache_root: Path | None = None) -> Path:
    """The vendored llama.cpp tree of the given (default: installed) llama-cpp-python version.

    Downloads the sdist with ``pip download --no-binary :all: --no-deps`` and
    unpacks it once; later calls return the cached tree.
    """
    version = version or installed_version()
    root = tools_root(version, cache_root)
    tree = root / "src"
    marker = tree / ".complete"
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        log = log or root / "download.log"
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                  "--disable-pip-version-check", "--dest", tmp, f"{DIST_NAME}=={version}"],
                 log, f"downloading the {DIST_NAME} {version} sdist")
            archives = sorted(Path(tmp).glob("*.tar.gz"))
            if not archives:
                raise RunFailed(f"pip downloaded no sdist for {DIST_NAME}=={version} (log: {log})")
            staging = Path(tmp) / "unpacked"
            with tarfile.open(archives[0]) as tar:
                tar.extractall(staging, filter="data")
            if tree.exists():
                shutil.rmtree(tree)
            os.replace(staging, tree)
        marker.write_text(version + "\n", encoding="utf-8")
    found = sorted(tree.glob("*/vendor/llama.cpp/CMakeLists.txt"))
    if not found:
        raise RunFailed(f"the {DIST_NAME} {version} sdist in {tree} has no vendor/llama.cpp; "
                        f"remove {tree} and retry")
    return found[0].parent


# ---------------------------------------------------------------------------
# configure arguments


def parse_define(flag: str) -> tuple[str, str]:
    """``-DNAME[:TYPE]=VALUE`` -> (NAME, flag); anything else is refused."""
    m = _DEFINE.match(flag)
    if not m or "\n" in flag:
        raise BadInput(f"build flag {flag!r} is not a CMake definition; write it as -DNAME=VALUE "
                       f"(e.g. -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod)")
    return m.group(1), flag


def merge_defines(*layers: Iterable[str]) -> tuple[str, ...]:
    """CMake ``-D`` flags, later layers overriding earlier ones by name, sorted by name."""
    merged: dict[str, str] = {}
    for layer in layers:
        for flag in layer:
            name, flag = parse_define(flag)
            merged[name] = flag
    return tuple(merged[name] for name in sorted(merged))


def define_value(args: Iterable[str], name: str) -> str | None:
    """The value a ``-DNAME=...`` among ``args`` sets, or None."""
    value = None
    for flag in args:
        m = _DEFINE.match(flag)
        if m and m.group(1) == name:
            value = m.group(3)
    return value


def is_on(value: str | None) -> bool:
    """CMake's truth for a cache value."""
    return (value or "").upper() in ("1", "ON", "YES", "TRUE", "Y")


# ---------------------------------------------------------------------------
# build trees


@dataclass(frozen=True)
class BuildTree:
    """One CMake build tree of the vendored source, named by what configured it."""

    name: str                 # "<label>-<key>"
    path: Path                # builds/<name>
    args: tuple[str, ...]     # every configure argument after -S/-B
    version: str              # the llama-cpp-python version (= llama.cpp revision)

    @property
    def log(self) -> Path:
        return self.path.with_name(self.name + ".log")

    @property
    def bin_dir(self) -> Path:
        return self.path / "bin"

    def cache_value(self, name: str) -> str | None:
        """A variable of the configured tree's CMakeCache.txt (``NAME:TYPE=VALUE``)."""
        try:
            text = (self.path / "CMakeCache.txt").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        prefix = name + ":"
        for line in text.splitlines():
            if line.startswith(prefix) and "=" in line:
                return line.split("=", 1)[1]
        return None


def build_key(label: str, args: Iterable[str], extra: dict | None = None) -> str:
    payload = {"label": label, "args": list(args), "extra": extra or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def build_tree(label: str, args: Iterable[str], version: str | None = None,
               cache_root: Path | None = None, key_extra: dict | None = None) -> BuildTree:
    """The build tree for these configure arguments (not created yet)."""
    version = version or installed_version()
    args = tuple(args)
    name = f"{label}-{build_key(label, args, key_extra)}"
    return BuildTree(name, tools_root(version, cache_root) / "builds" / name, args, version)


_CONFIGURED = ".edgequant-configured"


def cmake_build(tree: BuildTree, targets: Iterable[str], jobs: int | None = None,
                say: Say | None = None, cache_root: Path | None = None) -> Path:
    """Configure ``tree`` (once) and build ``targets`` in it; returns its bin/ folder.

    The caller holds ``locked(tree.path.parent, tree.name)``.  A failing step
    raises ``RunFailed`` naming the step and the log file.
    """
    say = say or (lambda _msg: None)
    targets = list(targets)
    if shutil.which("cmake") is None:
        raise RunFailed("cmake not found; install cmake and a C++ compiler to build llama.cpp tools")
    tree.path.parent.mkdir(parents=True, exist_ok=True)
    tree.log.write_text("", encoding="utf-8")
    say(f"fetching llama.cpp source ({DIST_NAME} {tree.version})")
    src = llama_cpp_source(tree.version, tree.log, cache_root)
    marker = tree.path / _CONFIGURED
    if not marker.exists():
        say("configuring llama.cpp with CMake")
        _run(["cmake", "-S", str(src), "-B", str(tree.path), *tree.args], tree.log, "configuring llama.cpp")
        marker.write_text(json.dumps(list(tree.args)) + "\n", encoding="utf-8")
    say(f"building {', '.join(targets)} with {jobs or os.cpu_count() or 1} jobs (a few minutes)")
    _run(["cmake", "--build", str(tree.path), "--target", *targets, "-j", str(jobs or os.cpu_count() or 1)],
         tree.log, f"building {', '.join(targets)}")
    for target in targets:
        if not (tree.bin_dir / target).is_file():
            raise RunFailed(f"building {target} finished but {tree.bin_dir / target} does not exist "
                            f"(log: {tree.log})")
    return tree.bin_dir


def host_tree(version: str | None = None, cache_root: Path | None = None) -> BuildTree:
    """The build tree of host tools; the ``host`` runner without extra flags shares it."""
    return build_tree("host", merge_defines(CMAKE_CONFIGURE_FLAGS), version, cache_root)


def build_llama_tool(target: str, jobs: int = 2, version: str | None = None,
                     on_progress: Say | None = None) -> Path:
    """Build one llama.cpp CMake target (``llama-bench``, ``llama-perplexity``, ``llama-imatrix``, ...) for this host.

    Returns the path of the binary (in the host build tree's bin/); the build
    is skipped when it already exists.  Raises ``RunFailed`` naming the
    failing step and its log file.
    """
    tree = host_tree(version)
    binary = tree.bin_dir / target
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    with locked(tree.path.parent, tree.name):
        if not (binary.is_file() and os.access(binary, os.X_OK)):  # else built by a concurrent caller
            cmake_build(tree, [target], jobs, on_progress)
    return binary

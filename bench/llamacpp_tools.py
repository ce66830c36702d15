"""Build llama.cpp's own command-line tools from the revision edgequant runs in-process.

llama-cpp-python ships as an sdist that vendors the whole llama.cpp tree
(``vendor/llama.cpp``).  Building ``llama-bench``, ``llama-perplexity`` and
friends from the sdist of the *installed* version keeps their numbers comparable
with what edgequant measures through the bindings: same kernels, same defaults.

Layout of the cache (under ``edgequant.paths.cache_dir()``)::

    tools/llama.cpp-<version>/
        src/            the unpacked sdist (llama_cpp_python-<version>/...)
        build/          the CMake build tree; binaries in build/bin/
        build-<target>.log

Every step is idempotent and skipped when its output exists; the source is
unpacked under a temporary name and renamed when complete, and a lock file
serializes concurrent builds.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from edgequant.errors import RunFailed
from edgequant.paths import cache_dir

DIST_NAME = "llama-cpp-python"

# The configuration the field notes measured: CPU only, no network, no server, no tests.
CMAKE_CONFIGURE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
)


def installed_version() -> str:
    """The version of the installed llama-cpp-python distribution."""
    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        raise RunFailed(f"{DIST_NAME} is not installed; install edgequant's dependencies "
                        f"(pip install -e .)") from None


def tools_root(version: str | None = None) -> Path:
    """The cache folder for one llama.cpp revision, named after the bindings' version."""
    return cache_dir() / "tools" / f"llama.cpp-{version or installed_version()}"


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
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
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        raise RunFailed(f"{what} failed (exit {proc.returncode}): {tail[0].strip()} (full log: {log})")


def llama_cpp_source(version: str | None = None, log: Path | None = None) -> Path:
    """The vendored llama.cpp tree of the given (default: installed) llama-cpp-python version.

    Downloads the sdist with ``pip download --no-binary :all: --no-deps`` and
    unpacks it once; later calls return the cached tree.
    """
    version = version or installed_version()
    root = tools_root(version)
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


def build_llama_tool(target: str, jobs: int = 2, version: str | None = None,
                     on_progress: Callable[[str], None] | None = None) -> Path:
    """Build one llama.cpp CMake target (``llama-bench``, ``llama-perplexity``, ...).

    Returns the path of the binary (``build/bin/<target>``); the build is
    skipped when it already exists.  Raises ``RunFailed`` naming the failing
    step and its log file.
    """
    root = tools_root(version)
    binary = root / "build" / "bin" / target
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    say = on_progress or (lambda _msg: None)
    with _locked(root):
        if binary.is_file() and os.access(binary, os.X_OK):  # built by a concurrent caller
            return binary
        log = root / f"build-{target}.log"
        log.write_text("", encoding="utf-8")
        say(f"fetching llama.cpp source ({DIST_NAME} {version or installed_version()})")
        src = llama_cpp_source(version, log)
        build = root / "build"
        if shutil.which("cmake") is None:
            raise RunFailed("cmake not found; install cmake and a C++ compiler to build llama.cpp tools")
        if not (build / "CMakeCache.txt").exists():
            say("configuring llama.cpp with CMake")
            _run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_CONFIGURE_FLAGS],
                 log, "configuring llama.cpp")
        say(f"building {target} (a few minutes)")
        _run(["cmake", "--build", str(build), "--target", target, "-j", str(jobs)],
             log, f"building {target}")
        if not binary.is_file():
            raise RunFailed(f"building {target} finished but {binary} does not exist (log: {log})")
    return binary

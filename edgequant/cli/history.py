"""``edgequant report``, ``pick``, ``tag``, ``compare`` and ``export``: stored runs read back."""

from __future__ import annotations

import json
import os
import time as _time
from pathlib import Path

import click

from edgequant.cli.app import cli
from edgequant.cli.options import (FORMATS, cache_option, cache_root, db_option, device_dir_option, open_store,
                                   profile_for, runner_dir_option)
from edgequant.cli.views import render_cases, render_flips, render_run, stderr_console
from edgequant.core.atomic import atomic_write_text
from edgequant.core.errors import BadInput, EdgequantError


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
    """Re-render a stored run (RUN_ID, `last`, `last-complete` or a tag), or list the runs with --list.

    Prints the run's speed and quality tables as a table, JSON, CSV or Markdown; --cases shows each eval
    case's output and parse result, --flips only the cases that changed against the reference, and
    --html writes a self-contained page with the tables, plots and cases.
    """
    if flips and cases_quant in (None, "*"):
        raise BadInput("--flips needs a rung: write `edgequant report --cases RUNG --flips` (e.g. --cases Q4_0)")
    store = open_store(db)
    if flips:
        render_flips(store, run_id, cases_quant.upper(), fmt, output)
        return
    if html_path is not None:
        from edgequant.results.html import write_html

        path = write_html(store, run_id, Path(html_path), quality)
        click.echo(f"wrote {path}")
        return
    if cases_quant is not None:
        render_cases(store, run_id, None if cases_quant == "*" else cases_quant.upper(), fmt, output)
        return
    if list_runs:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"runs in {store.path}")
        for col in ("run", "tags", "status", "model", "profile", "started", "command"):
            table.add_column(col)

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
    render_run(store, run_id, fmt, output)


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

    from edgequant.results import pick as picking

    cons = picking.constraints(min_tg=min_tg, min_pp=min_pp, max_ttft=max_ttft, max_rss=max_rss,
                               max_size=max_size, gates=gates)
    result = picking.pick(open_store(db), run_id, device, cons, quality)
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


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.argument("name", metavar="NAME")
@db_option
def tag(run_id, name, db):
    """Name a stored run (RUN: a run id, `last`, `last-complete` or another tag), e.g. `good`.

    A tag points at one run; tagging another run with the same name moves it.
    Every command that takes a run accepts the tag in its place.
    """
    store = open_store(db)
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
              help="Measure the artifacts of every flagged rung (a speed regression, a drop within the noise "
                   "floor, a noisy side) again where the runs measured it (this host or the phone), baseline and "
                   "candidate alternately (A, B, A, B ...), and let a rank test on the rounds' medians decide "
                   "its speed gates.")
@click.option("--rounds", type=int, default=3, show_default=True, metavar="N",
              help="With --recheck: how many times each side is measured (at least 3).")
@click.option("--profile", "profile_name", default="default", show_default=True, metavar="NAME|PATH",
              help="With --recheck: the profile whose [bench] contention settings the re-measurements follow.")
@device_dir_option
@runner_dir_option
@db_option
@cache_option
def compare(baseline, candidate, gates_name, junit_path, markdown_path, json_path, recheck, rounds, profile_name,
            device_dir, runner_dir, db, cache_dir):
    """Compare CANDIDATE (default `last`) with BASELINE and fail on a regression.

    Runs are given by id, `last`, `last-complete` or tag.  Rows pair on model,
    rung, device and parameters; the table shows only the columns that differ,
    with deltas.  A speed figure regresses when a Mann-Whitney U test on both
    runs' raw samples says it dropped and its median dropped beyond the gates'
    percentage and beyond the place's A/A noise floor (`edgequant noise`); a
    significant drop beyond the gates' percentage but within the floor is
    INCONCLUSIVE (two single runs cannot tell it from noise: --recheck
    decides), and without a stored floor the line says so.  A rung stored
    `noisy` is never judged.  Exit code 0: no regression; 1: a
    regression (speed, memory rise, significant quality drop by a paired
    McNemar test, suite gate PASS -> FAIL, or a rung or device missing); 2: bad
    input or no comparable rows.
    """
    from rich.console import Console

    from edgequant.results import compare as cmp
    from edgequant.results import compare_views as views
    from edgequant.results.gates import load_gates

    gates = load_gates(gates_name)
    if recheck:
        from edgequant.noise import MIN_ROUNDS, rounds_too_few

        if rounds < MIN_ROUNDS:
            raise BadInput(rounds_too_few(rounds))
    profile = profile_for(profile_name) if recheck else None
    store = open_store(db)
    result = cmp.compare_runs(store, baseline, candidate, gates)
    rechecks = []
    if recheck:
        from edgequant import noise

        console = stderr_console()
        flagged = noise.flagged_pairs(result)
        console.print(f"[cyan]•[/cyan] re-checking {len(flagged)} flagged rung(s), {rounds} alternated rounds each"
                      if flagged else "[cyan]•[/cyan] re-check: no rung is flagged; nothing to measure")

        def said(quant: str, phase: str) -> None:
            if phase.endswith(("done", "waiting for quiet")):     # one line per measurement, not per step
                console.print(f"  {quant}: {phase}", highlight=False)

        with noise.Places(cache_root(cache_dir), device_dir, runner_dir, say=lambda m: console.print(f"  {m}"),
                          cooldown=profile.device.cooldown(), folder="recheck") as places:
            rechecks = noise.recheck(store, result, rounds, profile.bench, pairs=flagged, on_phase=said,
                                     places=places)
        noise.apply_recheck(result, rechecks)
    for path, render in ((junit_path, views.render_junit), (markdown_path, views.render_markdown),
                         (json_path, views.render_json)):
        if path:
            if path == os.environ.get("GITHUB_STEP_SUMMARY") and Path(path).exists():
                with open(path, "a", encoding="utf-8") as fh:  # the job summary is appended to, never replaced
                    fh.write(render(result))
            else:
                atomic_write_text(Path(path), render(result))
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))
    views.render_table(result, console)
    for r in rechecks:
        word = {"fail": "[red]CONFIRMED[/red]", "pass": "[green]NOT CONFIRMED[/green]"}.get(r.status, "[yellow]SKIP[/yellow]")
        console.print(f"{word} {r.quant} on {r.device_id} · speed:{r.metric}: {r.message}", soft_wrap=True,
                      highlight=False)
    if result.regressions:
        raise EdgequantError(f"{len(result.regressions)} regression(s) against baseline {result.baseline['run_id']}: "
                             + "; ".join(f"{r.quant} {r.device_id} {r.gate}" for r in result.regressions[:5])
                             + (" ..." if len(result.regressions) > 5 else ""), 1)


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
    """Export a stored run (RUN: id, `last`, `last-complete` or tag) for other tools.

    The one format so far, --llama-bench (required): the run's pp/tg rows in llama-bench's own JSON or
    SQL output, readable by llama.cpp's scripts/compare-llama-bench.py.
    """
    from edgequant.results import export as ex

    if not llama_bench:
        raise BadInput("say what to export: `edgequant export --llama-bench RUN` (the only format so far)")
    store = open_store(db)
    tests = ex.llama_bench_rows(store, run_id, build_commit)
    text = ex.render_json(tests) if fmt == "json" else ex.render_sql(tests)
    if output:
        atomic_write_text(Path(output), text)
        click.echo(f"wrote {len(tests)} llama-bench rows to {output}", err=True)
    else:
        click.echo(text, nl=False)

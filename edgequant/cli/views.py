"""What the commands show: progress on stderr, and the rendering of stored runs, cases, runners and tune results."""

from __future__ import annotations

import csv as _csv
import io
import json as _json
import os
import time
from pathlib import Path

import click

from edgequant.core.atomic import atomic_write_text
from edgequant.core.errors import BadInput
from edgequant.estimate import duration


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
        self._last_phase_line = time.monotonic()
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(),
                                 DownloadColumn(binary_units=True), TimeElapsedColumn(),
                                 TextColumn("{task.fields[run_left]}"), console=console, transient=False)
        self.bench_progress = Progress(SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(),
                                       TextColumn("{task.completed:.0f}/{task.total:.0f} rungs"),
                                       TextColumn("{task.fields[phase]}"), TimeElapsedColumn(),
                                       TextColumn("left"), TimeRemainingColumn(),
                                       TextColumn("{task.fields[run_left]}"), console=console, transient=False)
        self._tasks: dict[str, int] = {}
        self._bench_task = None
        self.countdown = None     # edgequant.estimate.Countdown: the run's time left, once its plan is known

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        self.bench_progress.stop()
        return False

    def step(self, message: str) -> None:
        self.console.print(f"[cyan]•[/cyan] {message}", soft_wrap=self._plain)   # a log: one line each

    def expect(self, countdown) -> None:
        """Show the run's time left (``edgequant.estimate.Countdown``) as its stages finish."""
        self.countdown = countdown

    def bytes_progress(self, task: str, done: float, total: float | None) -> None:
        tid = self._tasks.get(task)
        if tid is None:
            tid = self._tasks[task] = self.progress.add_task(task, total=total, run_left="")
            self._task_started[task] = time.monotonic()
        self.progress.update(tid, completed=done, total=total)
        if self._plain and total and done >= total and task in self._task_started:
            took = time.monotonic() - self._task_started.pop(task)
            self.console.print(f"• {task}: done in {took:.1f} s{self._left(task)}", highlight=False)
        elif total and done >= total and task in self._task_started:
            self._task_started.pop(task)
            self._left(task)

    def _left(self, task: str, label: str | None = None) -> str:
        """"; run: about X left" once a stage of the plan finished (``edgequant.estimate.Countdown``)."""
        left = self.countdown.event(task, label) if self.countdown is not None else None
        if left is None:
            return ""
        for tid in self._tasks.values():
            self.progress.update(tid, run_left=f"run: ~{left} left")
        if self._bench_task is not None:
            self.bench_progress.update(self._bench_task, run_left=f"run: ~{left} left")
        return f"; run: about {left} left"

    def start_bench(self, n_rungs: int, label: str = "benchmarking") -> None:
        self.progress.stop()
        if self._bench_task is not None:
            self.bench_progress.update(self._bench_task, visible=True)
        self.bench_progress.start()     # (again, after pause())
        self._label = label
        self._bench_task = self.bench_progress.add_task(label, total=n_rungs, phase="", run_left="")
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
        now = time.monotonic()
        if self._plain and phase and now - self._last_phase_line >= PLAIN_PHASE_EVERY:
            # a long stage (the eval's teacher pass over several rungs) still shows it is moving
            self._last_phase_line = now
            started = self._rung_started.get(quant)
            self.console.print(f"• {quant}: {phase}" + (f" ({duration(now - started)} so far)" if started else ""),
                               highlight=False)

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
                    line += f", about {duration(per * left)} left"
                line += ")"
            self.console.print(line + self._left(quant, getattr(self, "_label", None)), highlight=False)
        else:
            self._left(quant, getattr(self, "_label", None))
            if status != "ok":
                self.console.print(f"[red]•[/red] {quant}: {status}")


PLAIN_PHASE_EVERY = 60.0     # seconds between progress lines of one long stage when stderr is not a terminal


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def render_run(store, run_id: str, fmt: str, output: str | None) -> None:
    from rich.console import Console

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
    _emit(text, output)


# columns of a table written to a file or a pipe (rich's tables are only as wide as their content)
REPORT_WIDTH = 260


def render_cases(store, run_id: str, quant: str | None, fmt: str, output: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    run = store.run(run_id)
    rows = store.eval_cases(run["run_id"], quant)
    if not rows:
        raise BadInput(f"run {run['run_id']} has no eval cases" + (f" for rung {quant}" if quant else "")
                       + "; run it with the eval suite (without --no-quality)")
    if fmt == "json":
        text = _json.dumps(rows, indent=2)
    elif fmt in ("csv", "md"):
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
    _emit(text, output)


def render_flips(store, run_id: str, quant: str, fmt: str, output: str | None) -> None:
    """``report --cases RUNG --flips``: the flipped cases, the reference's output beside the rung's."""

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

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
    _emit(text, output)


def tune_table(result, gates, speed_on: str) -> None:
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


def runner_summary(r) -> list[tuple[str, str]]:
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


def print_runner(r) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in runner_summary(r):
        table.add_row(key, value)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))
    console.print(table)
    console.print()


def _emit(text: str, output: str | None) -> None:
    """A rendered report to ``output`` (written whole under a temporary name) or to stdout."""
    if output:
        atomic_write_text(Path(output), text)
    else:
        click.echo(text, nl=not text.endswith("\n"))

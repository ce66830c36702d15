"""Runs a plan's cells: on the host in order, on the farm's phones in parallel (one worker thread per phone,
``farm.run_farm``), each cell through the runtime registered for its artifact's format.

On the host the cells go in the plan's order, the cells of one (stage, runtime) together (one progress bar;
the eval judges several rungs against the reference at once); the host's eval runs after every place's
speed, so the phones' rows do not wait for it.  On a phone the cells go rung after rung, under its lease:
each rung's cells are one item of the phone's queue (``CellGroup``), re-checked against the store before
they run (a phone reopened after a dropped connection repeats only what is not stored).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgequant.pipeline.host import BenchOutcome, RungOutcome
from edgequant.pipeline.plan import Cell, Plan, Stored
from edgequant.pipeline.registry import artifact_format, place_class, runtime_for
from edgequant.pipeline.scope import RunScope


@dataclass
class RunInputs:
    """What the cells of a run are measured with, besides the scope."""

    profile: Any
    artifacts: list                    # every built artifact of the run (GGUF and ONNX), reference first
    cache_root: Path
    suite: Any = None                  # the eval suite (None: no quality cells)
    prompting: str = "auto"
    quality_params: dict = field(default_factory=dict)   # what quality rows carry besides (a calibration split)
    variant_suite: Any = None          # the suite a ``"suite"`` bench depth is read from
    quality_on_device: bool = False
    on_host: bool = True
    perf_test: Any = None              # --onnx-perf-test (bench.onnx_device.LocalPerfTest) or None

    def of_format(self, fmt: str) -> list:
        return [a for a in self.artifacts if artifact_format(a) == fmt]

    def artifact(self, quant: str):
        return next(a for a in self.artifacts if a.quant == quant)


@dataclass
class Executed:
    failed: list[str] = field(default_factory=list)     # "RUNG [STAGE ]STATUS" of every cell that did not end ok
    lost: list = field(default_factory=list)            # farm.Phone given up
    farm: Any = None                                    # farm.FarmResult when phones ran


@dataclass
class CellGroup:
    """One rung's cells on one phone: one item of the farm's queue."""

    quant: str
    cells: list[Cell]


def _ended_badly(status: str) -> bool:
    return status not in ("ok", "noisy")     # a noisy rung was measured (and is marked), it did not fail


def _named(stage: str, status: str) -> str:
    return status if stage == "bench" else f"{stage} {status}"


def run_cells(scope: RunScope, inputs: RunInputs, cells: list[Cell], place) -> list[RungOutcome]:
    """Run ``cells`` (all of one stage and format) on the opened ``place`` through their runtime; how each
    rung ended.  ``tune`` asks for its candidates' cells one at a time through here."""
    if not cells:
        return []
    rt = runtime_for(cells[0].format)
    arts = [inputs.artifact(c.quant) for c in cells]
    return getattr(rt, cells[0].stage)(scope, inputs, place, arts)


def _host_batches(cells: list[Cell]) -> list[list[Cell]]:
    batches: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for c in cells:
        batches[(c.stage, c.format)].append(c)
    return list(batches.values())


def _run_on_host(scope: RunScope, inputs: RunInputs, cells: list[Cell], on_stage: Callable[[str], None]) -> list[str]:
    host = place_class("host")()
    failed = []
    for batch in _host_batches(cells):
        stage, rt = batch[0].stage, runtime_for(batch[0].format)
        on_stage({"bench": "benchmarking", "sustained": "sustained runs",
                  "quality": "running the eval suite"}[stage])
        label = rt.label(stage, inputs)
        if stage != "sustained":
            if label is None:
                scope.reporter.start_bench(len(batch))
            else:
                scope.reporter.start_bench(len(batch), label)
        failed += [f"{o.artifact.quant} {_named(stage, o.status)}" for o in run_cells(scope, inputs, batch, host)
                   if _ended_badly(o.status)]
    return failed


def phone_queues(plan: Plan) -> dict[str, list[CellGroup]]:
    """Per phone serial, its cells grouped rung by rung (a sustained cell joins the rung before it)."""
    out: dict[str, list[CellGroup]] = {}
    for c in plan.on("device"):
        queue = out.setdefault(c.place.name, [])
        if queue and (c.stage == "sustained" or queue[-1].quant == c.quant):
            queue[-1].cells.append(c)
        else:
            queue.append(CellGroup(c.quant, [c]))
    return out


def _phone_job(scope: RunScope, inputs: RunInputs):
    """The farm's job: one rung's cells on one phone (its thread, under its lease)."""
    phone_place = place_class("device")

    def job(dctx, groups: list[CellGroup], phone_reporter) -> BenchOutcome:
        mine = scope.with_reporter(phone_reporter)
        place = phone_place(dctx)
        outcome = BenchOutcome(scope.run_id)
        for group in groups:
            for c in group.cells:
                if Stored.read(mine.store, mine.run_id).holds(c, inputs.profile):  # stored before a reconnect
                    continue
                for o in run_cells(mine, inputs, [c], place):
                    if c.stage == "bench":
                        outcome.outcomes.append(o)
                    elif o.status != "ok":
                        outcome.outcomes.append(RungOutcome(o.artifact, _named(c.stage, o.status), o.detail))
        return outcome

    return job


def execute(plan: Plan, scope: RunScope, inputs: RunInputs, *, phones: list = (), runner_dir: str | None = None,
            console=None, on_stage: Callable[[str], None] = lambda _s: None) -> Executed:
    """Run every cell of ``plan``: the host's speed cells, the phones' cells (``phones``: the opened
    ``farm.Phone`` of the plan), then the host's eval.  A cell that fails is stored as such and named in
    ``Executed.failed``; a phone given up is in ``Executed.lost``."""
    from edgequant import farm

    out = Executed()
    out.failed += _run_on_host(scope, inputs, plan.on("host", ("bench", "sustained")), on_stage)
    if phones:
        on_stage("benchmarking on the phones")
        shared = scope.with_store(farm.LockedStore(scope.store))   # the phones' threads write through one lock
        pause = getattr(scope.reporter, "pause", None)
        if pause is not None:
            pause()
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        queues = phone_queues(plan)
        result = farm.run_farm(list(phones), {p.serial: queues.get(p.serial, []) for p in phones},
                               _phone_job(shared, inputs), runner_dir=runner_dir, cache_root=inputs.cache_root,
                               console=console)
        farm.render_summary(result, console)
        out.failed += result.failed_rungs
        out.lost, out.farm = result.lost, result
    out.failed += _run_on_host(scope, inputs, plan.on("host", ("quality",)), on_stage)
    return out

"""What a run will need before it starts: disk, memory and time, per stage.

A run is stages (conversion, one quantization per rung, one benchmark process per rung, the eval's
reference, generation and teacher processes).  This module estimates each from the checkpoint's
parameter count, the profile, the suite and this place's stored speed.  Each stage is measured as it runs
(``edgequant.core.meter.StageMeter``: wall time and peak RSS, sampled with psutil over a process tree, or its
``ru_maxrss``; ``pipeline`` and ``quantize.ladder``) and stored as ``stage_resources`` rows
(``Store.record_stages``), which are the history the next estimate is scaled from.

The estimator is a function of (model facts, profile, suite, place, store): ``estimate_run``; a plan of
cells can call it as it is.  Disk and memory are checked with ``check_resources``, before anything is
written, and refused with one line (``BadInput``, exit 2).

Without history, the defaults below are used: a build stage (conversion, a quantization) on a line through
two models measured on a 2-core x86-64 machine (the 268M default and the 3.88B MedGemma-shaped model);
benchmark and eval times are tokens over tokens/s, inversely with the parameter count; the eval's factors
were set so that the built-in suite over the 270M's ladder comes to the measured "about 1 min per rung for
the outputs and 1 min for the KLD pass" (README).  With history, a stage of the same model takes the time it
took (the median of the latest five), and another model's is scaled from this place's figures
(``scaled_seconds``: a line through this place's sizes, or the defaults' line at this place's pace).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from edgequant.core.errors import BadInput

GiB = 1024 ** 3
MiB = 1024 ** 2

# -- defaults (2-core x86-64 machine, 2 threads) -----------------------------------------------------------
# A build stage is a start-up (imports, the tokenizer's 262k entries, the file's header) plus a time that
# grows with the model.  Each is a line through two models measured here: the 268M default model and the
# 3.88B-parameter MedGemma-shaped one (README, "MedGemma 1.5 4B"), each the mean of the runs measured on a
# quiet machine (2026-12-06).  The converter: 15.3 s (15.4, 16.6, 13.8) and 48.4 s (39.1, 51.3, 54.9: its
# reads depend on what the page cache holds), a start-up of about 12.8 s.
SMALL_N, LARGE_N = 268_098_176, 3_880_263_168
CONVERT_S = (15.3, 48.4)
# edgequant's quantize stage (llama_model_quantize in a forked child, no importance matrix) per type
# (benchmarks/ladder_time.py --profile default); a type not listed takes its family's figures (IQ*: IQ4_XS;
# *_K*: Q4_K_M; others: Q8_0).  The K-quants take 3-4 x longer per parameter on the 4B than on the 268M
# (whose embedding table is most of the model), so a line through both sizes, not a time per parameter, is
# what carries one to the other.
QUANTIZE_S = {"Q8_0": (1.6, 20.3), "Q6_K": (2.4, 65.0), "Q5_K_M": (2.8, 100.4), "Q4_K_M": (2.8, 115.8),
              "Q4_0": (2.0, 19.1), "Q3_K_M": (3.0, 69.2), "Q2_K": (2.5, 84.9), "IQ4_XS": (10.6, 321.5)}
QUANTIZE_STARTUP_S = 0.3                    # below the small model: the start-up, then in proportion
PP_TPS_PARAMS = 950.0 * 268e6               # prompt processing: 950 t/s at 268M, inversely with size
TG_TPS_PARAMS = 100.0 * 268e6               # generation: 100 t/s at 268M
BENCH_START_S = 0.6                         # a benchmark process beyond its model's load and its tokens: start,
#                                             contention checks (measured 0.4-0.6 s on the 268M and the 4B)
LOAD_FIXED_S = 0.7                          # a model's load: 0.75-0.85 s for every rung of the 268M, ...
LOAD_S_PER_GIB = 1.2                        # ... then read and repacked at about this (4B: Q8_0 0.8 s/GiB, Q4_0 1.3,
LOAD_S_PER_GIB_FLOAT = 0.05                 # Q4_K_M 1.5); a float file is mapped (4B BF16: 0.9 s for 7.2 GiB)
EVAL_OVERHEAD_S = 4.0                       # an eval worker: start and load
EVAL_TOKENS_FRACTION = 0.5                  # of max_tokens, generated on average before a stop (set, see above)
EVAL_SLOT_SPEEDUP = 2.0                     # 8 slots side by side against single-stream tg (README: 44 -> 80-120)
TEACHER_TPS_FACTOR = 0.5                    # teacher-forced tokens/s against pp, full-vocabulary logits (set)
TEACHER_CONTEXT = 512 * MiB                 # a model's context in the teacher: KV cache and two blocks of logit
#                                             rows (bench.quality.teacher_context_bytes: about 0.44 GiB on the 4B)
# memory
PROCESS_BASE = 512 * MiB                    # an interpreter with llama.cpp loaded, its buffers, a context
CONVERT_BASE = 3 * GiB // 2                 # torch + transformers imported (1.7 GiB peak on the 270M)
CONVERT_WEIGHT_SHARE = 2                    # ... and half the weights held at once
QUANTIZE_BYTES_PER_PARAM = 0.5              # the largest tensors being quantized, dequantized to f32
DISK_MARGIN = 256 * MiB                     # quantize.ladder's margin

STAGE_ORDER = ("convert", "quantize", "onnx-export", "onnx-quantize", "bench", "bench-onnx", "eval-reference",
               "eval-generate", "eval-teacher")


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs of a checkpoint (``quantize.checkpoint.Checkpoint``)."""

    model_id: str
    n_params: int              # the language model: what every rung carries
    n_params_outside: int      # the vision tower and projector: in no rung
    weight_bytes: int

    @classmethod
    def of(cls, ckpt) -> "ModelFacts":
        return cls(ckpt.model_id, ckpt.n_params_estimate, ckpt.n_params_outside_ladder, ckpt.weight_bytes)


@dataclass
class StageEstimate:
    stage: str                 # one of STAGE_ORDER
    quant: str                 # the rung (or "KLD vs BF16: ..." for a teacher group)
    seconds: float
    memory_bytes: int
    basis: str                 # "history" (this place's stored speed), "default" or "cached"

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "quant": self.quant, "seconds": round(self.seconds, 1),
                "memory_bytes": int(self.memory_bytes), "basis": self.basis}


@dataclass
class DiskNeed:
    folder: Path
    need_bytes: int            # files still to be written there (cached ones cost nothing)
    free_bytes: int


@dataclass
class RunEstimate:
    stages: list[StageEstimate]
    disk: list[DiskNeed]
    memory_available: int
    place: str

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def largest(self) -> StageEstimate | None:
        """The stage that needs the most memory, of those that will run (a cached build does not)."""
        return max((s for s in self.stages if s.basis != "cached"), key=lambda s: s.memory_bytes, default=None)

    def by_stage(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.stages:
            out[s.stage] = out.get(s.stage, 0.0) + s.seconds
        return out


# ---------------------------------------------------------------------------
# sizes


def rung_bytes(n_params: int, quant: str) -> int:
    """A GGUF rung's estimated file size (quantize.ladder's bits-per-weight table)."""
    from edgequant.profiles.variants import base_quant
    from edgequant.quantize.ladder import estimated_bits_per_weight
    from edgequant.profiles.rungs import parse_rung

    return int(n_params * estimated_bits_per_weight(parse_rung(base_quant(quant)).base) / 8)


def disk_needs(ckpt, model_hash: str, profile, cache_root: Path) -> list[DiskNeed]:
    """Bytes the GGUF ladder (reference plus every rung) and the ONNX rungs still need, per filesystem, with
    what is free there.  Rungs already in the cache need nothing."""
    from edgequant.quantize.ladder import Ladder, free_bytes

    ladder = Ladder(ckpt, model_hash, profile, cache_root, imatrix=_NoImatrix())
    needs: dict[Path, int] = {ladder.folder: ladder.estimate_bytes(ladder.missing())}
    if profile.onnx:
        from edgequant.quantize.onnx_export import OnnxLadder

        onnx = OnnxLadder.for_profile(ckpt, model_hash, profile, cache_root)
        needs[onnx.folder] = needs.get(onnx.folder, 0) + onnx.needs()[1]
    by_device: dict[int, DiskNeed] = {}
    for folder, need in needs.items():
        probe = folder
        while not probe.exists():
            probe = probe.parent
        dev = os.stat(probe).st_dev
        if dev in by_device:
            by_device[dev].need_bytes += need
        else:
            by_device[dev] = DiskNeed(folder, need, free_bytes(folder))
    return list(by_device.values())


class _NoImatrix:
    """Stands in for the calibration while planning: an ``+imatrix`` rung's file is as big as its plain type's,
    and whether it is cached is decided by the real build (its key names the calibration)."""

    identity = "planning"


def check_resources(estimate: RunEstimate) -> None:
    """Refuse (one ``BadInput`` line, exit 2) a plan whose files do not fit on their disk, or whose largest
    stage does not fit in the memory available now."""
    for d in estimate.disk:
        if d.need_bytes and d.free_bytes < d.need_bytes + DISK_MARGIN:
            short = d.need_bytes + DISK_MARGIN - d.free_bytes
            raise BadInput(f"artifacts folder {d.folder}: this run needs about {_gib(d.need_bytes + DISK_MARGIN)} "
                           f"there ({_gib(d.need_bytes)} of files and a {DISK_MARGIN // MiB} MiB margin) and only "
                           f"{_gib(d.free_bytes)} is free, {_gib(short)} short; free some space or pass --cache-dir "
                           f"on a bigger disk")
    big = estimate.largest
    if big is not None and big.memory_bytes > estimate.memory_available:
        raise BadInput(f"{big.stage} of {big.quant} needs about {_gib(big.memory_bytes)} of memory and only "
                       f"{_gib(estimate.memory_available)} is available, "
                       f"{_gib(big.memory_bytes - estimate.memory_available)} short; close other programs or use a "
                       f"machine with more memory")


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


# ---------------------------------------------------------------------------
# this place's speed


BUILD_STAGES = ("convert", "quantize", "onnx-export", "onnx-quantize")
SAME_SIZE = 0.05            # history of a model within 5 % of this one's parameter count is this model's own


def quantize_points(quant: str) -> tuple[float, float]:
    """The quantize stage's default seconds for a rung's type on the two calibration models
    (``QUANTIZE_S``, by family for a type not listed)."""
    from edgequant.profiles.rungs import parse_rung
    from edgequant.profiles.variants import base_quant

    base = parse_rung(base_quant(quant)).base.upper()
    if base in QUANTIZE_S:
        return QUANTIZE_S[base]
    if base.startswith("IQ"):
        return QUANTIZE_S["IQ4_XS"]
    return QUANTIZE_S["Q4_K_M" if "_K" in base else "Q8_0"]


def two_point_seconds(points: tuple[float, float], n_params: int, startup: float) -> float:
    """The line through (SMALL_N, points[0]) and (LARGE_N, points[1]) at ``n_params``; below SMALL_N, from
    ``startup`` at no parameters to points[0] at SMALL_N (the line may start below zero)."""
    small, large = points
    if n_params < SMALL_N:
        return startup + (small - startup) * n_params / SMALL_N
    return small + (large - small) * (n_params - SMALL_N) / (LARGE_N - SMALL_N)


def default_stage_seconds(stage: str, quant: str, n_params: int) -> float | None:
    """A build stage's time from the defaults above; None for a stage the defaults do not cover."""
    if stage == "convert":
        startup = CONVERT_S[0] - (CONVERT_S[1] - CONVERT_S[0]) * SMALL_N / (LARGE_N - SMALL_N)
        return two_point_seconds(CONVERT_S, n_params, startup)
    if stage == "quantize":
        return two_point_seconds(quantize_points(quant), n_params, QUANTIZE_STARTUP_S)
    if stage == "onnx-export":
        return 45.0 / 268e6 * n_params
    if stage == "load":
        from edgequant.profiles import FLOAT_TYPES
        from edgequant.profiles.variants import base_quant

        per_gib = LOAD_S_PER_GIB_FLOAT if base_quant(quant).upper() in FLOAT_TYPES else LOAD_S_PER_GIB
        return LOAD_FIXED_S + rung_bytes(n_params, quant) / GiB * per_gib
    return None


def same_model(points: list[tuple[int, float]], n_params: int) -> list[float]:
    """The values of (parameters, value) points, newest first, that are this model's own (within SAME_SIZE)."""
    return [v for m, v in points if abs(m - n_params) <= SAME_SIZE * n_params]


def nearest_size(points: list[tuple[int, float]], n_params: int) -> tuple[int, list[float]]:
    """The stored model size nearest ``n_params`` (by ratio) and its values, newest first."""
    size = min((m for m, _ in points), key=lambda m: abs(math.log(m / n_params)))
    return size, [v for m, v in points if m == size]


def scaled_seconds(points: list[tuple[int, float]], n_params: int,
                   default: Callable[[int], float | None] | None = None) -> float:
    """A stage's time for a model of ``n_params`` from the (parameters, seconds) it took here before, newest
    first.  In order:

    * the median of the same model's times, when there are any;
    * a least-squares line through this place's points, when they span model sizes: its own start-up and
      slope.  A K-quant's time per parameter grows with the model, so the line can start below zero; it is
      used then only at or above the smallest size;
    * the nearest size's time, scaled along ``default`` (parameters -> seconds, the defaults' line) at this
      place's pace, or in proportion to the parameters where it gives none."""
    same = same_model(points, n_params)
    if same:
        return statistics.median(same[:5])
    sizes = [m for m, _ in points]
    if min(sizes) * 1.5 <= max(sizes):
        xs, ys = [float(m) for m, _ in points], [sec for _, sec in points]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        start = my - slope * mx
        if slope > 0 and (start >= 0 or n_params >= min(sizes)):   # a negative start-up only between or above
            return start + slope * n_params
    nearest, secs = nearest_size(points, n_params)
    sec = statistics.median(secs[:5])
    if default is not None and default(nearest):
        return sec * default(n_params) / default(nearest)
    return sec * n_params / nearest


@dataclass
class Speed:
    """Tokens/s scaled to a model of ``n_params`` from this place's history (or the defaults), per rung, and
    the build stages' times here."""

    pp: dict[str, list[tuple[int, float]]] = field(default_factory=dict)   # base quant -> (parameters, pp t/s),
    tg: dict[str, list[tuple[int, float]]] = field(default_factory=dict)   # newest first
    stage_points: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    #  stage -> quant -> (parameters, seconds) of its stored rows here, newest first

    def tps(self, kind: str, quant: str, n_params: int) -> tuple[float, str]:
        """A rung's tokens/s for a model of ``n_params``: the same model's own (the median of its latest
        five), else the nearest size's, inversely with the parameter count; a rung not measured here takes
        the median of this place's other rungs; without history, the defaults."""
        table = self.pp if kind == "pp" else self.tg
        default = PP_TPS_PARAMS if kind == "pp" else TG_TPS_PARAMS

        def at(points: list[tuple[int, float]]) -> float:
            same = same_model(points, n_params)
            if same:
                return statistics.median(same[:5])
            size, values = nearest_size(points, n_params)
            return values[0] * size / n_params          # the newest of the nearest size

        if quant in table:
            return at(table[quant]), "history"
        if table:
            return statistics.median(at(points) for points in table.values()), "history"
        return default / n_params, "default"

    def stage_seconds(self, stage: str, quant: str, n_params: int) -> float | None:
        """A build stage's time here (None without history of that stage).  A rung this place has not built
        takes its default time, scaled by how this place's other rungs compared with theirs."""
        by_quant = self.stage_points.get(stage)
        if not by_quant:
            return None

        def scaled(q: str) -> float:
            return scaled_seconds(by_quant[q], n_params, lambda m: default_stage_seconds(stage, q, m))

        if quant in by_quant:
            return scaled(quant)
        mine = default_stage_seconds(stage, quant, n_params)
        ratios = [scaled(q) / theirs for q in by_quant if (theirs := default_stage_seconds(stage, q, n_params))]
        if mine is not None and ratios:
            return mine * statistics.median(ratios)
        return statistics.median(scaled(q) for q in by_quant)


def place_speed(store, place: str) -> Speed:
    """This place's stored speed: the pp/tg t/s of every rung it benchmarked, its build stages' times and its
    benchmarks' model loads (stage ``load``), each with the model's size, newest first."""
    speed = Speed()
    if store is None:
        return speed
    from edgequant.profiles.variants import base_quant

    for quant, metric, value, n_params in store.speed_history(place):
        if metric == "load_time":       # a benchmark's model load: a stage of its own, scaled like the builds
            speed.stage_points.setdefault("load", {}).setdefault(base_quant(quant), []).append((n_params, value))
            continue
        table = speed.pp if metric == "pp_tps" else speed.tg
        table.setdefault(base_quant(quant), []).append((n_params, value))
    for r in store.stage_history(place):
        if r["n_params"] and r["seconds"] is not None and r["stage"] in BUILD_STAGES:
            speed.stage_points.setdefault(r["stage"], {}).setdefault(r["quant"], []).append(
                (int(r["n_params"]), float(r["seconds"])))
    return speed


# ---------------------------------------------------------------------------
# the estimate


def estimate_run(facts: ModelFacts, profile, suite=None, place: str | None = None, store=None,
                 missing: Iterable[str] | None = None, onnx_missing: bool = False,
                 disk: list[DiskNeed] | None = None, memory_available: int | None = None,
                 build_only: bool = False) -> RunEstimate:
    """Each stage's time and memory for a run of ``profile`` (and the eval ``suite``, if any) on ``place`` (a
    device id; this host by default), scaled from ``store``'s history of that place, or the defaults.

    ``missing``: the rungs still to be built (all of them when None); ``disk``: ``disk_needs``' answer;
    ``build_only``: the ladder alone (``edgequant quantize``)."""
    if place is None:
        from edgequant.devices.host import host_device_id

        place = host_device_id()
    if memory_available is None:
        import psutil

        memory_available = psutil.virtual_memory().available
    speed = place_speed(store, place)
    n = max(1, facts.n_params)
    rungs = profile.rungs()
    ref = rungs[0]
    missing = set(rungs if missing is None else missing)
    sizes = {q: rung_bytes(n, q) for q in rungs}
    stages: list[StageEstimate] = []

    def timed(stage: str, quant: str, default: float) -> tuple[float, str]:
        got = speed.stage_seconds(stage, quant, n)
        return (got, "history") if got is not None else (default, "default")

    # building: the reference once, then each rung from it
    secs, basis = timed("convert", ref, default_stage_seconds("convert", ref, n))
    stages.append(StageEstimate("convert", ref, secs if ref in missing else 0.0,
                                CONVERT_BASE + facts.weight_bytes // CONVERT_WEIGHT_SHARE,
                                basis if ref in missing else "cached"))
    for q in rungs[1:]:
        secs, basis = timed("quantize", q, default_stage_seconds("quantize", q, n))
        stages.append(StageEstimate("quantize", q, secs if q in missing else 0.0,
                                    PROCESS_BASE + int(QUANTIZE_BYTES_PER_PARAM * n),
                                    basis if q in missing else "cached"))
    if profile.onnx:
        from edgequant.quantize.onnx_export import EXPORT_BASE, EXPORT_BYTES_PER_PARAM

        secs, basis = timed("onnx-export", "ONNX", default_stage_seconds("onnx-export", "ONNX", n))
        stages.append(StageEstimate("onnx-export", "ONNX", secs if onnx_missing else 0.0,
                                    n * EXPORT_BYTES_PER_PARAM + EXPORT_BASE,
                                    basis if onnx_missing else "cached"))
    if build_only:
        return RunEstimate(stages, disk or [], memory_available, place)
    # one benchmark process per rung: warm-up and repetitions of the pp and tg tests, per variant
    b = profile.bench
    n_variants = max(1, len(b.depths) * len(b.cache_types))
    for q in rungs:
        pp, basis_pp = speed.tps("pp", q, n)
        tg, basis_tg = speed.tps("tg", q, n)
        # as the benchmark worker runs them: a warm-up is one whole prompt and one generated token
        per_variant = (b.repetitions + b.warmup) * b.n_prompt / pp + (b.repetitions * b.n_gen + b.warmup) / tg
        depth_fill = sum(d for d in b.depths if isinstance(d, int)) / pp * len(b.cache_types)
        load, basis_load = timed("load", q, default_stage_seconds("load", q, n))
        stages.append(StageEstimate("bench", q, BENCH_START_S + load + n_variants * per_variant + depth_fill,
                                    PROCESS_BASE + sizes[q],
                                    "history" if "history" in (basis_pp, basis_tg, basis_load) else "default"))
    # the eval: the reference's outputs, each rung's outputs, then the teacher pass over the reference's tokens
    if suite is not None:
        cases = list(suite.cases)
        gen_tokens = sum(suite.formats[c.format].max_tokens for c in cases) * EVAL_TOKENS_FRACTION
        prompt_tokens = sum(len(c.prompt) // 4 + 64 for c in cases)   # about 4 characters a token, and a prefix
        for i, q in enumerate(rungs):
            pp, basis = speed.tps("pp", q, n)
            tg, _ = speed.tps("tg", q, n)
            secs = EVAL_OVERHEAD_S + prompt_tokens / pp + gen_tokens / (tg * EVAL_SLOT_SPEEDUP)
            stages.append(StageEstimate("eval-reference" if i == 0 else "eval-generate", q, secs,
                                        PROCESS_BASE + sizes[q], basis))
        # the teacher pass: the reference's tokens through the reference and each rung, in one process per group
        # of rungs that fit beside the reference (bench.quality.teacher_groups, each model counted as its file
        # and a context); the reference decodes every position once per group, so each rung's share is its own
        # pass plus its part of the group's reference pass and start
        from edgequant.bench.quality import teacher_groups

        teacher_tokens = prompt_tokens + gen_tokens
        pp_ref, _ = speed.tps("pp", ref, n)
        shared = EVAL_OVERHEAD_S + teacher_tokens / (pp_ref * TEACHER_TPS_FACTOR)
        groups = teacher_groups(sizes[ref] + TEACHER_CONTEXT, [(q, sizes[q] + TEACHER_CONTEXT) for q in rungs[1:]],
                                memory_available)
        for group in groups:
            for q in group:
                pp, basis = speed.tps("pp", q, n)
                secs = teacher_tokens / (pp * TEACHER_TPS_FACTOR) + shared / len(group)
                # memory: the smallest group the teacher can run, the reference and this rung beside it
                stages.append(StageEstimate("eval-teacher", q, secs, PROCESS_BASE + sizes[ref] + sizes[q], basis))
    return RunEstimate(stages, disk or [], memory_available, place)


def plan_run(resolved, profile, suite, cache_root: Path, store=None, place: str | None = None,
             build_only: bool = False) -> RunEstimate:
    """``estimate_run`` for a resolved checkpoint with what its cache already holds: the plan ``run`` prints
    and checks before it starts."""
    from edgequant.quantize.ladder import Ladder

    ckpt = resolved.checkpoint
    ladder = Ladder(ckpt, resolved.model_hash, profile, cache_root, imatrix=_NoImatrix())
    missing = {r.quant for r in ladder.missing()}
    onnx_missing = False
    if profile.onnx:
        from edgequant.quantize.onnx_export import OnnxLadder

        onnx_missing = bool(OnnxLadder.for_profile(ckpt, resolved.model_hash, profile, cache_root).missing())
    return estimate_run(ModelFacts.of(ckpt), profile, suite, place, store, missing=missing,
                        onnx_missing=onnx_missing, disk=disk_needs(ckpt, resolved.model_hash, profile, cache_root),
                        build_only=build_only)


def format_plan(estimate: RunEstimate, width: int = 100) -> list[str]:
    """The plan as plain lines: one per stage kind (with its rungs), then disk, memory and the total."""
    lines = []
    for stage in STAGE_ORDER:
        items = [s for s in estimate.stages if s.stage == stage]
        if not items:
            continue
        total = sum(s.seconds for s in items)
        basis = "cached" if all(s.basis == "cached" for s in items) else \
            ("history" if any(s.basis == "history" for s in items) else "default speed")
        names = ", ".join(f"{s.quant} {duration(s.seconds)}" for s in items)
        lines.append(f"{stage}: {duration(total)} ({basis}) - {names}")
    for d in estimate.disk:
        lines.append(f"disk: {_gib(d.need_bytes)} to write in {d.folder} ({_gib(d.free_bytes)} free)")
    big = estimate.largest
    if big is not None:
        lines.append(f"memory: largest stage {big.stage} {big.quant} about {_gib(big.memory_bytes)} "
                     f"({_gib(estimate.memory_available)} available)")
    lines.append(f"time: about {duration(estimate.total_seconds)} in all on {estimate.place}")
    return lines


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# ---------------------------------------------------------------------------
# remaining time, as the run goes


class Countdown:
    """The time left of a run: the estimates of the stages not finished yet, scaled by how the finished ones
    compared with their estimates (a machine slower than its history today shows it at once)."""

    def __init__(self, estimate: RunEstimate):
        self._left = [s for s in estimate.stages if s.seconds > 0]
        self._estimated_done = 0.0
        self._actual_done = 0.0
        self._mark = time.monotonic()     # when the previous event came (the plan was made: the start)

    def finish(self, stages: tuple[str, ...] | str, quant: str | None, seconds: float) -> None:
        """Stages of one rung finished in ``seconds`` together: their estimates for that rung go (or, when none
        names that rung, the first estimate of ``stages[0]``)."""
        stages = (stages,) if isinstance(stages, str) else stages
        matches = [s for s in self._left if s.stage in stages and s.quant == quant]
        if not matches:
            matches = [s for s in self._left if s.stage == stages[0]][:1]
        estimated = 0.0
        for match in matches:
            self._left.remove(match)
            estimated += match.seconds
        if estimated:
            self._estimated_done += estimated
            self._actual_done += seconds

    def event(self, task: str, label: str | None = None) -> str | None:
        """A progress event (``countdown_event``): the stages it finishes go, timed since the previous event;
        returns the time left as text ("3 min 10 s"), or None for an event no estimate covers."""
        found = countdown_event(task, label)
        if found is None:
            return None
        now = time.monotonic()
        self.finish(found[0], found[1], now - self._mark)
        self._mark = now
        return duration(self.remaining())

    def remaining(self) -> float:
        left = sum(s.seconds for s in self._left)
        if self._estimated_done > 0:
            left *= min(4.0, max(0.25, self._actual_done / self._estimated_done))
        return left


EVAL_STAGES = ("eval-reference", "eval-generate", "eval-teacher")


def countdown_event(task: str, label: str | None = None) -> tuple[tuple[str, ...], str] | None:
    """The plan's stages (and rung) a progress event finishes: a finished byte task (``"converting to BF16"``,
    ``"quantizing Q8_0"``) or a rung done under a progress label (``"benchmarking"``, ``"eval triage"``);
    None for events no estimate covers (hashing, checking, sustained runs, ONNX)."""
    if label is None:
        for prefix, stage in (("converting to ", "convert"), ("quantizing ", "quantize")):
            if task.startswith(prefix):
                return (stage,), task[len(prefix):]
        return None
    if label == "benchmarking":
        return ("bench",), task
    if label.startswith("eval ") and "(ONNX)" not in label:
        return EVAL_STAGES, task
    return None


# ---------------------------------------------------------------------------
# stored stages


def stage_row(stage: str, quant: str, device_id: str, n_params: int | None, seconds: float | None,
              peak_rss_bytes: float | None, status: str = "ok", reused: bool = False,
              detail: str | None = None, data_bytes: int | None = None) -> dict[str, Any]:
    """One ``stage_resources`` row (``Store.record_stages``); ``data_bytes``: what the stage moved (a push)."""
    return {"stage": stage, "quant": quant, "device_id": device_id, "n_params": n_params, "seconds": seconds,
            "peak_rss_bytes": peak_rss_bytes, "status": str(status), "reused": reused, "detail": detail,
            "data_bytes": data_bytes}

"""A run as a plan: its cells (artifact x place x stage, with the parameters each is measured with).

The plan is computed from the profile's rungs, the places (this host, the phones) and what the store already
holds for the run: a resumed run is the same plan minus the cells stored (``Stored``).  The executor
(``edgequant.pipeline.executor``) runs the cells; ``edgequant run --dry-run`` prints them.

Which cells a run has:

* ``bench`` (speed and memory): every rung on every measuring place (the host when ``--device`` names it or
  no phone, each phone);
* ``sustained``: the profile's ``[sustained]`` rung on every measuring place whose runtime has the stage;
* ``quality`` (the eval suite, unless ``--no-quality``): every rung, on the host, or on each phone with
  ``--quality-on-device`` for runtimes that evaluate there (the host keeps it when it measures too, and for
  the other runtimes).

A stage is *done* for a cell when the store holds: a rung status for (rung, place) (``bench``, a failed rung
included: it is not measured again), ``sustained`` rows on that place, ``quality`` rows of the rung on the
host / on that phone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from edgequant.pipeline.registry import Runtime, artifact_format, runtimes
from edgequant.profiles.variants import BenchVariant, base_quant

STAGES = ("bench", "sustained", "quality")


@dataclass(frozen=True)
class PlaceSpec:
    """A place as the plan names it (before it is opened): ``kind`` (``host``/``device``), its name (the
    phone's serial) and the device id its rows carry."""

    kind: str
    name: str
    device_id: str

    @classmethod
    def host(cls) -> "PlaceSpec":
        from edgequant.devices.host import host_device_id

        return cls("host", "host", host_device_id())

    @classmethod
    def phone(cls, serial: str) -> "PlaceSpec":
        return cls("device", serial, f"adb:{serial}")


@dataclass(frozen=True)
class Rung:
    """A rung as the plan sees it: its name and artifact format (built or not yet)."""

    quant: str
    format: str
    is_reference: bool = False


@dataclass(frozen=True)
class Cell:
    quant: str
    format: str
    runtime: str
    place: PlaceSpec
    stage: str
    params: tuple[tuple[str, Any], ...] = ()      # what it is measured with (sorted items)

    def describe(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.stage:<9} {self.quant:<22} {self.runtime:<12} {self.place.name}" + (f"  ({shown})" if shown
                                                                                         else "")


@dataclass
class Stored:
    """What the store already holds for a run (see the module doc for when a stage is done)."""

    benched: set[tuple[str, str]] = field(default_factory=set)          # (base rung, device id)
    sustained: set[str] = field(default_factory=set)                    # device ids
    quality_host: set[str] = field(default_factory=set)                 # rungs
    quality_device: set[tuple[str, str]] = field(default_factory=set)   # (rung, device id)

    @classmethod
    def read(cls, store, run_id: str | None) -> "Stored":
        if store is None or run_id is None:
            return cls()
        return cls(benched={(base_quant(s["quant"]), s["device_id"]) for s in store.rung_statuses(run_id)},
                   sustained={d for _, d in store.measured(run_id, "sustained")},
                   quality_host={q for q, _ in store.measured(run_id, "quality", "host")},
                   quality_device=store.measured(run_id, "quality", "device"))

    def holds(self, cell: Cell, profile=None) -> bool:
        """Whether the store holds ``cell``; a GGUF rung's quality cell only when the quality of each of its
        names is stored (``profile``: its quantized KV cache types add ``RUNG@kv=TYPE`` names)."""
        dev = cell.place.device_id
        if cell.stage == "bench":
            return (cell.quant, dev) in self.benched
        if cell.stage == "sustained":
            return dev in self.sustained
        names = quality_names(profile, cell.quant, cell.format)
        if cell.place.kind == "host":
            return all(n in self.quality_host for n in names)
        return all((n, dev) in self.quality_device for n in names)


def quality_names(profile, quant: str, fmt: str = "gguf") -> list[str]:
    """The names a rung's quality is stored under: its own and, for a GGUF rung, ``RUNG@kv=TYPE`` for each
    quantized KV cache type of ``profile`` (None: its own only)."""
    if profile is None or fmt != "gguf":
        return [quant]
    return [quant] + [BenchVariant(0, t).name(quant) for t in profile.bench.cache_types if t != "f16"]


@dataclass
class Plan:
    cells: list[Cell]
    stored: list[Cell] = field(default_factory=list)      # cells of the full plan the store already holds

    def on(self, kind: str, stages: Iterable[str] = STAGES) -> list[Cell]:
        stages = tuple(stages)
        return [c for c in self.cells if c.place.kind == kind and c.stage in stages]

    def lines(self, annotate: Callable[[Cell], str] | None = None) -> list[str]:
        """One line per cell to measure, then the count of those a resumed run holds already.  ``annotate``
        adds its text to a cell's line (the place for per-cell estimates of disk, memory and time)."""
        out = [c.describe() + (f"  {annotate(c)}" if annotate is not None else "") for c in self.cells]
        if self.stored:
            out.append(f"({len(self.stored)} cell(s) already stored in the run are not measured again)")
        return out


def rungs_of_profile(profile) -> list[Rung]:
    """The profile's rungs, without building them: GGUF (reference first) then its ``[onnx]`` variants."""
    from edgequant.quantize.onnx_export import rung_name

    names = profile.rungs()
    return ([Rung(q, "gguf", i == 0) for i, q in enumerate(names)]
            + [Rung(rung_name(v.name), "onnx") for v in profile.onnx.variants])


def rungs_of(artifacts) -> list[Rung]:
    return [Rung(a.quant, artifact_format(a), a.is_reference) for a in artifacts]


def _params(runtime: Runtime, stage: str, kind: str, profile, suite) -> tuple[tuple[str, Any], ...]:
    s = profile.bench
    if stage == "bench":
        out: dict[str, Any] = {"threads": s.threads or "auto", "n_prompt": s.n_prompt, "n_gen": s.n_gen,
                               "reps": s.repetitions, "warmup": s.warmup}
        if runtime.format == "gguf" and s.has_variants:
            out.update(depths="/".join(str(d) for d in s.depths), cache_types="/".join(s.cache_types))
    elif stage == "sustained":
        spec = profile.sustained
        out = {"runs": spec.runs, "n_gen": spec.n_gen or s.n_gen}
    else:
        out = {"suite": suite.name, "cases": len(suite.cases)}
    return tuple(out.items())


def build(profile, rungs: list[Rung], places: list[PlaceSpec], suite=None, *, quality_on_device: bool = False,
          stored: Stored | None = None) -> Plan:
    """The run's cells, in the order the executor runs them on each place (see the module doc).

    ``places``: where speed is measured (``PlaceSpec.host()`` and/or phones); ``suite``: the eval suite
    (None: no quality stage); ``stored``: what a resumed run holds already (those cells are left out)."""
    stored = stored or Stored()
    host = next((p for p in places if p.kind == "host"), None)
    phones = [p for p in places if p.kind != "host"]
    by_runtime = [(rt, [r for r in rungs if r.format == rt.format]) for rt in runtimes()]
    by_runtime = [(rt, rs) for rt, rs in by_runtime if rs]
    unknown = sorted({r.format for r in rungs} - {rt.format for rt, _ in by_runtime})
    if unknown:
        from edgequant.pipeline.registry import runtime_for

        runtime_for(unknown[0])      # BadInput naming the format and the registered ones
    target = profile.sustained.target(profile) if profile.sustained is not None else None
    cells: list[Cell] = []

    def cell(rt: Runtime, quant: str, place: PlaceSpec, stage: str) -> Cell:
        return Cell(quant, rt.format, rt.name, place, stage, _params(rt, stage, place.kind, profile, suite))

    def quality_on_host(rt: Runtime) -> bool:
        return suite is not None and rt.measures("quality", "host") and (
            host is not None or not (quality_on_device and phones and rt.measures("quality", "device")))

    # the host: speed of every runtime's rungs, its sustained series; the eval comes after the phones
    host_spec = host or PlaceSpec.host()
    if host is not None:
        for stage in ("bench", "sustained"):
            for rt, rs in by_runtime:
                if not rt.measures(stage, "host"):
                    continue
                quants = [r.quant for r in rs] if stage == "bench" else [q for q in [target] if q in
                                                                          {r.quant for r in rs}]
                cells += [cell(rt, q, host, stage) for q in quants]
    # each phone: rung after rung, everything measured there (speed, the sustained series after the first
    # rung's speed, the eval with --quality-on-device)
    for phone in phones:
        for rt, rs in by_runtime:
            sustained_left = target in {r.quant for r in rs} and rt.measures("sustained", "device")
            for r in rs:
                cells.append(cell(rt, r.quant, phone, "bench"))
                if sustained_left:
                    cells.append(cell(rt, target, phone, "sustained"))
                    sustained_left = False
                if suite is not None and quality_on_device and rt.measures("quality", "device"):
                    cells.append(cell(rt, r.quant, phone, "quality"))
    for rt, rs in by_runtime:
        if quality_on_host(rt):
            cells += [cell(rt, r.quant, host_spec, "quality") for r in rs]
    return Plan([c for c in cells if not stored.holds(c, profile)], [c for c in cells if stored.holds(c, profile)])

"""A registry per axis of a run: runtimes (by artifact format) and places (by kind).

A runtime registers by subclassing :class:`Runtime` with the artifact format it runs, as gguf-py's quant
classes register with ``__init_subclass__(qtype=...)``: the class statement is the registration, so a runtime
is one module and cannot be half-registered (a table beside it could name a class that no longer exists, or
forget one).  The same holds for places (:class:`Place`, by kind).  Transports register for a device spec in
``edgequant.devices.select``.

The built-in runtimes and places live in the modules of ``BUILTIN_MODULES``, imported on the first look-up;
a runtime defined anywhere else (a plugin, a test) registers as soon as its module is imported.

What a new runtime implements (see the README, "The run as a plan of cells"):

* ``name`` (what its rows record as ``runtime``) and the ``format=`` it registers for (``Artifact.record()``'s
  ``format``);
* ``stages``: per place kind, the stages it can measure there (``bench``, ``sustained``, ``quality``);
* one method per stage it lists, ``bench`` / ``sustained`` / ``quality``, each called as
  ``method(scope, inputs, place, artifacts) -> list[RungOutcome]`` with the artifacts of that place's cells:
  it measures them on ``place``, stores their rows through ``scope`` and says how each ended;
* optionally ``label(stage, inputs)``: the progress bar's title for a stage on the host.

What a new place implements is :class:`Place`'s list; its constructor takes what opens it (a phone: the
opened ``DeviceContext``, its lease, its cool-down).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

from edgequant.core.errors import BadInput

# imported on the first look-up: each holds one or more registered classes
BUILTIN_MODULES = ("edgequant.pipeline.runtime_llamacpp", "edgequant.pipeline.runtime_onnx",
                   "edgequant.pipeline.places")

RUNTIMES: dict[str, type["Runtime"]] = {}     # artifact format -> runtime class, in registration order
PLACES: dict[str, type["Place"]] = {}         # place kind -> place class

_loaded = False


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BUILTIN_MODULES:
            importlib.import_module(name)


class Runtime:
    """Measures the artifacts of one format on a place.  Subclass with ``format=FORMAT`` to register."""

    name: ClassVar[str]
    format: ClassVar[str]
    stages: ClassVar[dict[str, tuple[str, ...]]] = {}    # place kind -> stages it measures there

    def __init_subclass__(cls, format: str | None = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if format is None:           # an abstract intermediate class
            return
        if format in RUNTIMES and RUNTIMES[format].__qualname__ != cls.__qualname__:
            raise ValueError(f"artifact format {format!r} has a runtime already ({RUNTIMES[format].name})")
        cls.format = format
        RUNTIMES[format] = cls

    def measures(self, stage: str, kind: str) -> bool:
        return stage in self.stages.get(kind, ())

    def label(self, stage: str, inputs) -> str | None:
        """The progress title of a stage on the host (None: the reporter's default)."""
        return None


class Place(ABC):
    """Where cells run and single GGUF files are measured: this host, a phone.  Subclass with ``kind=KIND``
    to register; ``place_class(KIND)`` opens it, for a run's executor and for ``edgequant.noise.Places``
    (``edgequant noise``, ``compare --recheck``) alike.

    An opened place provides:

    * its identity: ``name`` (what progress shows), ``device_id`` (what its rows and noise floors are keyed
      by), ``device()`` (the device record stored with its rows) and ``facts()``;
    * for a run's runtimes: ``push(local, sha256, name)`` (the path the file has there) and
      ``run_measured(argv, timeout=)`` (exit code, output, peak memory);
    * for measuring one GGUF the way a run measures a rung there: ``prepare(path, sha256, quant,
      on_progress)`` (a handle to measure: the path there), ``measure(handle, settings, repack, on_progress)``
      (a result with ``pp``, ``tg`` and ``contention``), ``repack(settings)`` and ``params(settings)`` (what
      its rows record);
    * the other load there: ``read_load(seconds)`` (a ``devices.contention.Contention``) and ``read_top()``
      (its busiest processes), which ``noise.measure_until_quiet`` waits on."""

    kind: ClassVar[str]
    name: str
    device_id: str

    def __init_subclass__(cls, kind: str | None = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if kind is None:
            return
        cls.kind = kind
        PLACES[kind] = cls

    @abstractmethod
    def device(self) -> dict:
        ...

    @abstractmethod
    def facts(self) -> Any:
        ...

    @abstractmethod
    def push(self, local, sha256: str, name: str) -> str:
        ...

    @abstractmethod
    def run_measured(self, argv: list[str], *, timeout: float):
        ...

    @abstractmethod
    def repack(self, settings) -> bool | None:
        ...

    @abstractmethod
    def params(self, settings) -> dict[str, Any]:
        ...

    @abstractmethod
    def prepare(self, path, sha256: str, quant: str, on_progress: Callable[[str], None] | None = None) -> Any:
        ...

    @abstractmethod
    def measure(self, handle, settings, repack: bool | None = None,
                on_progress: Callable[[str], None] | None = None) -> Any:
        ...

    @abstractmethod
    def read_load(self, seconds: float) -> Any:
        ...

    @abstractmethod
    def read_top(self) -> list[dict]:
        ...


def runtimes() -> list[Runtime]:
    """One instance of every registered runtime, in registration order (the order a run measures them)."""
    _load_builtins()
    return [cls() for cls in RUNTIMES.values()]


def runtime_for(fmt: str) -> Runtime:
    _load_builtins()
    cls = RUNTIMES.get(fmt)
    if cls is None:
        raise BadInput(f"no runtime registered for artifact format {fmt!r}; registered: "
                       f"{', '.join(sorted(RUNTIMES)) or 'none'}")
    return cls()


def place_class(kind: str) -> type[Place]:
    _load_builtins()
    return PLACES[kind]


def artifact_format(art) -> str:
    """The format an artifact is stored as (``gguf``, ``onnx``, ...)."""
    return str(art.record()["format"])

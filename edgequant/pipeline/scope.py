"""One run's scope: the store it writes to, its id, the model it measures and where progress goes (a
``Reporter``; ``NullReporter`` drops it).

Every cell of a run writes through its scope, which makes the rows' keys (``key``) and records them
(``record``, ``record_many``), instead of passing ``(store, run_id, model_id, model_hash)`` and building
``RowKey`` by hand at each call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Protocol

from edgequant.results.store import Measurement, RowKey


class Reporter(Protocol):
    def step(self, message: str) -> None: ...
    def bytes_progress(self, task: str, done: float, total: float | None) -> None: ...
    def rung_started(self, quant: str) -> None: ...
    def rung_phase(self, quant: str, phase: str) -> None: ...
    def rung_done(self, quant: str, status: str) -> None: ...


class NullReporter:
    def step(self, message: str) -> None:
        pass

    def bytes_progress(self, task: str, done: float, total: float | None) -> None:
        pass

    def rung_started(self, quant: str) -> None:
        pass

    def rung_phase(self, quant: str, phase: str) -> None:
        pass

    def rung_done(self, quant: str, status: str) -> None:
        pass

    def start_bench(self, n_rungs: int, label: str = "") -> None:
        pass

    def pause(self) -> None:
        pass


@dataclass(frozen=True)
class RunScope:
    store: Any                 # results.store.Store, or farm.LockedStore in the phones' threads
    run_id: str
    model_id: str
    model_hash: str
    reporter: Any

    @classmethod
    def of(cls, store, run_id: str, resolved, reporter) -> "RunScope":
        """The scope of run ``run_id`` measuring ``resolved`` (``prepare.ResolvedModel``)."""
        return cls(store, run_id, resolved.checkpoint.model_id, resolved.model_hash, reporter)

    def with_store(self, store) -> "RunScope":
        return replace(self, store=store)

    def with_reporter(self, reporter) -> "RunScope":
        return replace(self, reporter=reporter)

    def key(self, art, *, device_id: str, device: dict, runtime: str, runtime_version: str, params: dict,
            quant: str | None = None, is_reference: bool | None = None) -> RowKey:
        """The key of ``art``'s rows measured on ``device_id`` with ``runtime`` and ``params`` (``quant`` and
        ``is_reference`` default to the artifact's; a variant such as ``Q4_K_M@d512`` passes its own)."""
        return RowKey(model_id=self.model_id, model_hash=self.model_hash,
                      quant=art.quant if quant is None else quant, artifact_sha256=art.sha256 if art else "",
                      is_reference=(art.is_reference if art else False) if is_reference is None else is_reference,
                      device_id=device_id, device=device, runtime=runtime, runtime_version=runtime_version,
                      params=params)

    def record(self, key: RowKey, measurements: Iterable[Measurement], status: str | None = "ok",
               detail: str | None = None, cases: Iterable[dict] = (), suite: str | None = None) -> str | None:
        """One rung's rows and status in one transaction (``Store.record_rung``)."""
        return self.store.record_rung(self.run_id, key, measurements, status=status, detail=detail, cases=cases,
                                      suite=suite)

    def record_many(self, entries) -> list[str | None]:
        """Several rung's rows in one transaction (``Store.record_rungs``)."""
        return self.store.record_rungs(self.run_id, entries)

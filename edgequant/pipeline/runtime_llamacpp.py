"""llama.cpp: the GGUF rungs' runtime.  Speed with llama-bench (in-process bindings on the host, the
on-device llama-bench on a phone), a ``[sustained]`` series, and generation for the eval suite (on the host,
or with llama-completion on a phone with ``--quality-on-device``)."""

from __future__ import annotations

from dataclasses import replace

from edgequant.pipeline.host import RungOutcome
from edgequant.pipeline.registry import Runtime


class LlamaCpp(Runtime, format="gguf"):
    name = "llama.cpp"
    stages = {"host": ("bench", "sustained", "quality"), "device": ("bench", "sustained", "quality")}

    def label(self, stage: str, inputs) -> str | None:
        return f"eval {inputs.suite.name}" if stage == "quality" else None

    def bench(self, scope, inputs, place, arts) -> list[RungOutcome]:
        if place.kind == "host":
            from edgequant.pipeline.host import bench_rungs

            return bench_rungs(scope, arts, inputs.profile, suite=inputs.variant_suite).outcomes
        from edgequant.pipeline.device_run import bench_rungs_on_device

        return bench_rungs_on_device(scope, arts, inputs.profile, place.ctx, suite=inputs.variant_suite).outcomes

    def sustained(self, scope, inputs, place, arts) -> list[RungOutcome]:
        ladder = inputs.of_format(self.format)
        if place.kind == "host":
            from edgequant.pipeline.host import sustained_rung

            status = sustained_rung(scope, ladder, inputs.profile)
        else:
            from edgequant.pipeline.device_run import sustained_on_device

            status = sustained_on_device(scope, ladder, inputs.profile, place.ctx)
        return [RungOutcome(a, status) for a in arts]

    def quality(self, scope, inputs, place, arts) -> list[RungOutcome]:
        """The eval of ``arts`` against the reference (always part of the ladder: its outputs are the yardstick);
        a quantized KV cache's variants (``RUNG@kv=q8_0``) come back under their own names."""
        ladder = inputs.of_format(self.format)
        only = {a.quant for a in arts}
        if place.kind == "host":
            from edgequant.pipeline.host import quality_rungs

            statuses = quality_rungs(scope, ladder, inputs.profile, inputs.suite, inputs.cache_root,
                                     inputs.prompting, only=only, extra_params=inputs.quality_params,
                                     stored={q for q, _ in scope.store.measured(scope.run_id, "quality", "host")})
        else:
            from edgequant.pipeline.device_quality import quality_rungs_on_device

            statuses = quality_rungs_on_device(scope, ladder, inputs.profile, inputs.suite, place.ctx,
                                               prompting=inputs.prompting, extra_params=inputs.quality_params,
                                               only=only)
        by_quant = {a.quant: a for a in ladder}
        return [RungOutcome(by_quant.get(q) or replace(arts[0], quant=q, is_reference=False), st)
                for q, st in statuses.items()]

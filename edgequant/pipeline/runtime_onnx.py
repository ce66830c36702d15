"""onnxruntime: the ONNX rungs' runtime.  Speed on the host (``bench.onnx_host``) and on a phone with
onnxruntime_perf_test (``--onnx-perf-test``; without it the phone's ONNX rungs are stored as skipped), and
the eval suite on the host against the GGUF reference's outputs."""

from __future__ import annotations

from edgequant.pipeline.host import RungOutcome
from edgequant.pipeline.registry import Runtime

ONNX_NO_PERF_TEST = ("no onnxruntime_perf_test for the phone: pass --onnx-perf-test PATH (onnxruntime_perf_test "
                     "built for Android arm64-v8a; see the README, 'ONNX rungs')")


class OnnxRuntime(Runtime, format="onnx"):
    name = "onnxruntime"
    stages = {"host": ("bench", "quality"), "device": ("bench",)}

    def label(self, stage: str, inputs) -> str | None:
        return "benchmarking ONNX" if stage == "bench" else f"eval {inputs.suite.name} (ONNX)"

    def bench(self, scope, inputs, place, arts) -> list[RungOutcome]:
        if place.kind == "host":
            from edgequant.pipeline.onnx_rungs import bench_onnx_rungs

            return bench_onnx_rungs(scope, arts, inputs.profile).outcomes
        from edgequant.pipeline.device_run import bench_onnx_rungs_on_device

        return bench_onnx_rungs_on_device(scope, arts, inputs.profile, place.ctx,
                                          inputs.cache_root / "onnx-device-sets", inputs.perf_test,
                                          skip_reason=ONNX_NO_PERF_TEST).outcomes

    def quality(self, scope, inputs, place, arts) -> list[RungOutcome]:
        from edgequant.pipeline.onnx_rungs import quality_onnx_rungs

        if inputs.quality_on_device and not inputs.on_host:   # the phones' eval generates with llama.cpp
            scope.reporter.step("ONNX rungs: quality computed on the host; onnxruntime_perf_test only times Run")
        statuses = quality_onnx_rungs(scope, inputs.of_format("gguf"), arts, inputs.profile, inputs.suite,
                                      inputs.cache_root, inputs.prompting, inputs.quality_params)
        by_quant = {a.quant: a for a in arts}
        return [RungOutcome(by_quant[q], st) for q, st in statuses.items()]

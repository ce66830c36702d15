"""Benchmark an ONNX rung on this host with onnxruntime, in a child process, like the GGUF rungs.

``measure_onnx`` starts ``python -m edgequant.bench.onnx_host`` (the worker
below, the same JSON-in / JSON-out protocol and progress lines as
``edgequant.bench.host_worker``), and returns the same ``HostBenchResult``,
so ONNX rows carry the same metrics with the same meaning:

* ``load_s``: creating the ``InferenceSession`` (reading the model, graph
  optimizations, weight pre-packing): what a user waits for before the first
  prompt, like model load + first context on llama.cpp.
* pp (prompt processing): ``n_prompt`` random tokens in one ``run`` with an
  empty KV cache, all outputs fetched (the logits of every position, as the
  optimum export computes them, and the new cache); ``warmup`` runs first.
  pp t/s = n_prompt / seconds; ``ttft_ms`` is that same time (time to first
  token, tokenization and sampling excluded).
* tg (text generation): from an empty cache, ``n_gen`` single-token runs, each
  feeding the previous ``present.*`` back as ``past_key_values.*`` with the
  attention mask one longer: a KV-cache generation loop; tg t/s = n_gen /
  seconds; one warm-up step first.
* Tokens are drawn from a seeded RNG before the clock starts.
* Memory: ``VmHWM`` and the sampled maxima of ``RssAnon``/``RssFile``, exactly
  as the GGUF worker reads them (``host_worker.RssSampler``).  onnxruntime
  reads the weights into its own buffers, so they are anonymous memory here,
  where llama.cpp's mmapped weights are file pages.

The execution provider (``CPUExecutionProvider``), intra-op threads (= the
profile's threads) and inter-op threads (1, sequential execution) are recorded
with the result.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

from edgequant.devices.contention import Window
from edgequant.bench.host import HostBenchResult, result_from, run_worker
from edgequant.core.errors import BenchError
from edgequant.bench.memory import RssSampler, read_status
from edgequant.bench.worker import WorkerError, serve
from edgequant.core.errors import BadInput
from edgequant.profiles import BenchSettings
from edgequant.quantize.onnx_export import check_onnx_model

WORKER_MODULE = "edgequant.bench.onnx_host"
PROVIDER = "CPUExecutionProvider"


def build_request(path: Path, settings: BenchSettings) -> dict[str, Any]:
    return {"path": str(path), "threads": settings.resolved_threads(), "n_prompt": settings.n_prompt,
            "n_gen": settings.n_gen, "repetitions": settings.repetitions, "warmup": settings.warmup,
            "provider": PROVIDER}


def measure_onnx(path: Path, settings: BenchSettings, on_progress: Callable[[str], None] | None = None,
                 **_ignored: Any) -> HostBenchResult:
    """Measure the ONNX model ``path`` with ``settings`` in a fresh worker process; ``BenchError`` otherwise."""
    path = Path(path)
    try:
        check_onnx_model(path)
    except BadInput as exc:
        raise BenchError("failed", str(exc)) from None
    request = build_request(path, settings)
    return result_from(run_worker(request, WORKER_MODULE, settings.timeout, on_progress, path), path)


# ---------------------------------------------------------------------------
# the worker (and the KV-cache session shared with the eval and device code)


class KVStepper:
    """What the eval needs of a causal LM with a KV cache: ``step`` (tokens after ``past_len`` cached ones ->
    (logits [n, vocab], the cache after them)), ``empty_cache``, and, built on ``step``, ``chunks`` and
    ``prefill``.  ``KVModel`` (onnxruntime) and ``checkpoint_model.CheckpointModel`` (transformers) are two."""

    def empty_cache(self) -> Any:
        raise NotImplementedError

    def step(self, tokens, cache: Any, past_len: int):
        raise NotImplementedError

    def chunks(self, tokens, cache: Any, past_len: int, size: int = 256):
        """Run ``tokens`` in pieces of ``size`` (bounding the logits held at once: a 262k vocabulary
        makes 1 MiB per position); yields (logits of the piece, cache after it) for each piece."""
        for off in range(0, len(tokens), size):
            logits, cache = self.step(tokens[off:off + size], cache, past_len + off)
            yield logits, cache

    def prefill(self, tokens, cache: Any, past_len: int):
        """(logits of the last token, the cache after ``tokens``), in chunks."""
        last = None
        for logits, cache in self.chunks(tokens, cache, past_len):
            last = logits[-1:]
        return last, cache


class KVModel(KVStepper):
    """An optimum ``text-generation-with-past`` ONNX model in onnxruntime, with its cache layout."""

    def __init__(self, path: str, threads: int, provider: str = PROVIDER):
        import numpy as np
        import onnxruntime as ort

        self.np = np
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(path, so, providers=[provider])
        self.provider = self.session.get_providers()[0]
        inputs = {i.name: i for i in self.session.get_inputs()}
        for need in ("input_ids", "attention_mask"):
            if need not in inputs:
                raise ValueError(f"{path} has no '{need}' input: not a text-generation-with-past export")
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        if not self.past_names:
            raise ValueError(f"{path} has no past_key_values inputs: export it with task text-generation-with-past")
        self.has_position_ids = "position_ids" in inputs
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.present_names = ["present." + n[len("past_key_values."):] for n in self.past_names]
        missing = [n for n in ["logits"] + self.present_names if n not in self.output_names]
        if missing:
            raise ValueError(f"{path} lacks the outputs {', '.join(missing)}")
        first = inputs[self.past_names[0]]
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.kv_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        vocab = next(o for o in self.session.get_outputs() if o.name == "logits").shape[-1]
        self.n_vocab = int(vocab) if isinstance(vocab, int) else 0

    def empty_cache(self) -> dict[str, Any]:
        z = self.np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        return {n: z for n in self.past_names}

    def feeds(self, tokens, cache: dict[str, Any], past_len: int) -> dict[str, Any]:
        np = self.np
        n = len(tokens)
        feeds = {"input_ids": np.asarray([tokens], dtype=np.int64),
                 "attention_mask": np.ones((1, past_len + n), dtype=np.int64)}
        if self.has_position_ids:
            feeds["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None, :]
        feeds.update(cache)
        return feeds

    def step(self, tokens, cache: dict[str, Any], past_len: int):
        """Run ``tokens`` after ``past_len`` cached ones: (logits [n, vocab], the new cache)."""
        outs = self.session.run(self.output_names, self.feeds(tokens, cache, past_len))
        by_name = dict(zip(self.output_names, outs))
        new_cache = {p: by_name[q] for p, q in zip(self.past_names, self.present_names)}
        return by_name["logits"][0], new_cache


def _measure(req: dict, progress: Callable[[str], None]) -> dict:
    for key in ("path", "threads", "n_prompt", "n_gen", "repetitions", "warmup"):
        if key not in req:
            raise WorkerError(f"the request has no '{key}'")
    baseline = read_status(("VmRSS",)).get("VmRSS", 0)
    import onnxruntime as ort

    rng = random.Random(req.get("seed", 1))
    threads = int(req["threads"])
    pp_tps: list[float] = []
    ttft_ms: list[float] = []
    tg_tps: list[float] = []
    with RssSampler(float(req.get("sample_interval_s", 0.010))) as sampler:
        progress("load")
        t0 = time.perf_counter_ns()
        try:
            model = KVModel(req["path"], threads, req.get("provider", PROVIDER))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise WorkerError(f"onnxruntime cannot load {req['path']}: {str(exc).splitlines()[0][:300]}") from None
        load_s = (time.perf_counter_ns() - t0) / 1e9
        sampler.sample()
        vocab = model.n_vocab or 256

        def tokens(n: int) -> list[int]:
            return [rng.randrange(vocab) for _ in range(n)]

        n_prompt, n_gen, reps = int(req["n_prompt"]), int(req["n_gen"]), int(req["repetitions"])
        with Window() as window:    # the other load on the machine while the tests ran
            if n_prompt > 0:
                for i in range(int(req["warmup"])):
                    progress(f"warmup pp {i + 1}/{req['warmup']}")
                    model.step(tokens(n_prompt), model.empty_cache(), 0)
                for i in range(reps):
                    progress(f"pp {i + 1}/{reps}")
                    toks, cache = tokens(n_prompt), model.empty_cache()
                    t0 = time.perf_counter_ns()
                    model.step(toks, cache, 0)
                    seconds = (time.perf_counter_ns() - t0) / 1e9
                    pp_tps.append(n_prompt / seconds)
                    ttft_ms.append(seconds * 1000.0)
                sampler.sample()
            if n_gen > 0:
                if int(req["warmup"]) > 0:
                    progress("warmup tg 1/1")
                    model.step(tokens(1), model.empty_cache(), 0)
                for i in range(reps):
                    progress(f"tg {i + 1}/{reps}")
                    toks, cache = tokens(n_gen), model.empty_cache()
                    t0 = time.perf_counter_ns()
                    for pos, tok in enumerate(toks):
                        _logits, cache = model.step([tok], cache, pos)
                    seconds = (time.perf_counter_ns() - t0) / 1e9
                    tg_tps.append(n_gen / seconds)
                sampler.sample()
        status = read_status()
    progress("done")
    size = sum(p.stat().st_size for p in Path(req["path"]).parent.iterdir()
               if p.is_file() and p.name.startswith(Path(req["path"]).name))
    return {
        "load_s": load_s, "pp_tps": pp_tps, "tg_tps": tg_tps, "ttft_ms": ttft_ms,
        "peak_rss_bytes": status["VmHWM"], "peak_rss_anon_bytes": sampler.peak_anon,
        "peak_rss_file_bytes": sampler.peak_file, "baseline_rss_bytes": baseline, "rss_samples": sampler.samples,
        "n_params": 0, "model_size_bytes": size, "n_vocab": model.n_vocab, "threads": threads,
        "repack": False, "execution_provider": model.provider, "intra_op_threads": threads,
        "inter_op_threads": 1, "request": req, "runtime_version": ort.__version__,
        "system_info": f"onnxruntime {ort.__version__} {model.provider} intra_op={threads} inter_op=1 sequential",
        "contention": window.result.as_dict() if window.result is not None else None,
    }


def main() -> int:
    return serve(_measure)


if __name__ == "__main__":
    sys.exit(main())

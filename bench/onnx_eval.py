"""The eval suite on an ONNX rung: the same prompts, parsers and metrics as the GGUF rungs.

``evaluate_onnx_rung`` runs ``python -m edgequant.bench.onnx_eval`` (the same
worker protocol as ``eval_worker``) and scores its output with
``quality.compute_metrics`` against the cached reference outputs of the bf16
GGUF, so an ONNX row and a GGUF row of one run are directly comparable.

So that nothing but the runtime differs, the worker loads the reference GGUF
with llama.cpp beside the ONNX model and takes from it everything that is not
the model's arithmetic: the prompt text (chat template or few-shot block,
``eval_worker.prompt_parts``), the token ids of every prompt, the bytes of
every generated token and the end-of-generation test.  The ONNX model decodes
greedily with its KV cache: the shared prefix of a format once, then each case
from a copy of that cache (onnxruntime returns new ``present`` arrays, so the
prefix cache is reused as is).  For KLD and top-1 agreement the reference's
own output tokens are teacher-forced through both models after the same
prompt, and ``eval_worker.kld_rows`` compares the full-vocabulary
distributions at every position.

``checkpoint_outputs`` runs the same worker with the checkpoint itself in
transformers (``checkpoint_model.CheckpointModel``, float32) in place of the
ONNX model: what a faithful fp32 export decodes.
"""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgequant.bench.checkpoint_model import CheckpointModel
from edgequant.bench.eval_worker import KLD_CHUNK, Session, kld_rows, prompt_parts
from edgequant.bench.host_worker import WorkerLog
from edgequant.bench.worker import WorkerError, serve
from edgequant.bench.onnx_host import KVModel
from edgequant.bench.quality import (RungQuality, base_request, call_worker, case_results, compute_metrics,
                                     evaluate_gates)

WORKER_MODULE = "edgequant.bench.onnx_eval"


def evaluate_onnx_rung(path: Path, quant: str, suite, ref, threads: int, timeout: float,
                       on_progress: Callable[[str], None]):
    """A ``quality.RungQuality`` for the ONNX model ``path`` against the reference ``ref``."""
    req = base_request(path, suite, threads, None, ref.prompting)
    req.update(generate=True, reference=str(ref.path), teacher={"tokens": ref.tokens, "reference": str(ref.path)})
    data = call_worker(req, timeout, on_progress, module=WORKER_MODULE)
    return _scored(quant, suite, ref, data)


def checkpoint_outputs(folder: Path, suite, ref, threads: int, timeout: float, on_progress: Callable[[str], None]):
    """The suite decoded by the checkpoint itself in transformers (float32, ``checkpoint_model``), with the
    ONNX rungs' prompts, token ids and greedy loop: the reference the fp32 export must reproduce.  A
    ``quality.RungQuality`` named ``checkpoint`` (no KLD: that is measured against the GGUF reference)."""
    req = base_request(folder, suite, threads, None, ref.prompting)
    req.update(backend="checkpoint", reference=str(ref.path))
    return _scored("checkpoint", suite, ref, call_worker(req, timeout, on_progress, module=WORKER_MODULE))


def _scored(quant: str, suite, ref, data: dict):
    results = case_results(suite, data)
    for cid, s in data["scores"].items():
        results[cid].kld, results[cid].top1 = s["kld"], s["top1"]
    metrics = compute_metrics(suite, results, ref, False, data["gen_tokens"], data["gen_seconds"])
    return RungQuality(quant, list(results.values()), metrics, ref.prompting, evaluate_gates(suite, metrics))


# ---------------------------------------------------------------------------
# the worker


def _reference_rows(ref, tokens: list[int], ref_tokens: list[int]) -> np.ndarray:
    """The reference's logits at each position of its own output, after the case's prompt."""
    ref.fork_prefix(1)
    ref.decode(tokens, seq=1)
    rows = [ref.logits(-1).copy()]
    rest = ref_tokens[:len(ref_tokens) - 1]
    for off in range(0, len(rest), KLD_CHUNK):
        chunk = rest[off:off + KLD_CHUNK]
        ref.decode(chunk, seq=1, logits_all=True)
        rows.extend(ref.logits(i).copy() for i in range(len(chunk)))
    return np.stack(rows)


def run(req: dict, progress) -> dict:
    import llama_cpp as L
    import onnxruntime as ort

    log = WorkerLog(L, echo=bool(req.get("verbose")))
    ref = Session(L, dict(req, path=req["reference"], mmap=True), log)
    checkpoint = req.get("backend") == "checkpoint"
    try:
        if checkpoint:
            model = CheckpointModel(req["path"], int(req["threads"]))
        else:
            model = KVModel(req["path"], int(req["threads"]))
    except Exception as exc:  # noqa: BLE001 - onnxruntime and transformers raise their own types
        who = "transformers" if checkpoint else "onnxruntime"
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise WorkerError(f"{who} cannot load {req['path']}: {first}") from None
    if model.n_vocab and model.n_vocab != ref.n_vocab:
        raise WorkerError(f"{req['path']} has a {model.n_vocab}-token vocabulary and the reference "
                          f"{req['reference']} {ref.n_vocab}: they are not the same model")
    template = ref.chat_template()
    mode = req.get("prompting", "auto")
    if mode == "auto":
        mode = "chat" if template else "completion"
    if mode == "chat" and not template:
        raise WorkerError(f"{req['reference']} has no chat template; use prompting = completion")
    teacher = req.get("teacher")
    results: dict[str, dict[str, Any]] = {}
    scores: dict[str, dict[str, list]] = {}
    gen_tokens, gen_seconds = 0, 0.0
    total = sum(len(g["cases"]) for g in req["groups"])
    done = 0
    for group in req["groups"]:
        prefix_text, suffix = prompt_parts(ref, group, mode, template)
        prefix = ref.tokenize(prefix_text, add_special=True)
        stops = [s.encode("utf-8") for s in group.get("stop", []) if s]
        encoded = [(c, ref.tokenize(c["prompt"] + suffix, add_special=False)) for c in group["cases"]]
        t0 = time.perf_counter()
        _logits, prefix_cache = model.prefill(prefix, model.empty_cache(), 0)
        gen_seconds += time.perf_counter() - t0
        if teacher:
            longest = max([len(t) + len(teacher["tokens"].get(c["id"], [])) for c, t in encoded], default=0)
            ref.ensure_context(len(prefix) + longest + 8, 2)
            ref.start_prefix(prefix)
        for case, tokens in encoded:
            out, toks, stopped = bytearray(), [], "max_tokens"
            max_tokens = int(case["max_tokens"])
            t0 = time.perf_counter()
            if max_tokens > 0:
                logits, cache = model.prefill(tokens, prefix_cache, len(prefix))
                pos = len(prefix) + len(tokens)
                while True:
                    tok = int(np.argmax(logits[-1]))
                    toks.append(tok)
                    if L.llama_vocab_is_eog(ref.vocab, tok):
                        stopped = "eog"
                        break
                    out += ref.piece(tok)
                    hit = next((s for s in stops if s in out), None)
                    if hit is not None:
                        del out[out.index(hit):]
                        stopped = "stop"
                        break
                    if len(toks) >= max_tokens:
                        break
                    logits, cache = model.step([tok], cache, pos)
                    pos += 1
            gen_seconds += time.perf_counter() - t0
            gen_tokens += len(toks)
            results[case["id"]] = {"id": case["id"], "output_b64": base64.b64encode(bytes(out)).decode("ascii"),
                                   "tokens": toks, "n_prompt": len(prefix) + len(tokens), "stopped": stopped}
            ref_tokens = (teacher or {}).get("tokens", {}).get(case["id"])
            if ref_tokens and tokens:
                want = _reference_rows(ref, tokens, ref_tokens)
                start, seen, kld, same = len(tokens) - 1, 0, [], []
                for lg, _c in model.chunks(tokens + ref_tokens[:-1], prefix_cache, len(prefix)):
                    lo = max(start - seen, 0)
                    if lo < len(lg):
                        d, t = kld_rows(want[seen + lo - start:seen + len(lg) - start], lg[lo:])
                        kld += d.tolist()
                        same += [bool(x) for x in t]
                    seen += len(lg)
                scores[case["id"]] = {"kld": kld, "top1": same}
            done += 1
            progress(f"eval {done}/{total}")
    ref.close()
    cases_out = [results[c["id"]] for g in req["groups"] for c in g["cases"]]
    return {"cases": cases_out, "scores": scores, "prompting": mode, "gen_tokens": gen_tokens,
            "gen_seconds": gen_seconds, "slots": 1,
            "runtime_version": model.provider if checkpoint else ort.__version__,
            "execution_provider": model.provider}


def main() -> int:
    return serve(run)


if __name__ == "__main__":
    sys.exit(main())

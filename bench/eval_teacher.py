"""The eval's teacher pass: the reference's outputs teacher-forced through several rungs in one process.

Run through ``edgequant.bench.eval_worker`` with ``"op": "teacher"``: the request names several rungs
and nothing is generated: ``{"op": "teacher", "reference": str, "rungs": [str | {"path": str,
"cache_type": str, "flash_attn": str}, ...], "tokens": {case_id: [token, ...]}, ...}`` scores the
reference's output tokens through every rung against the reference, and the result is
``{"scores": {rung_path: {case_id: {"kld": [...], "top1": [...], "dp": [...]}}}}`` (dp: the rung's
probability of the reference's next token minus the reference's, llama-perplexity's delta-p).
With ``"generate": true`` the same pass also makes every rung's greedy outputs (``bench.eval_spec``:
speculative verification with the reference's output as the draft; ``"tie_margin"``, ``"margins"``),
returned as ``{"outputs": {rung_key: <a plain run's result, plus "speculative" counts>}}``.

Like ``llama-perplexity --kl-divergence``: at every output position the KL divergence
KL(reference || rung) over the full vocabulary and whether both agree on the most likely token.  The
reference decodes each position once and its distribution is compared with every rung's, so its cost
does not grow with the ladder.
"""

from __future__ import annotations

from edgequant.bench.eval_spec import TIE_MARGIN, SpecRung, top2
from edgequant.bench.eval_worker import (DEFAULT_SLOTS, KLD_CHUNK, RefRows, Session, WorkerError, WorkerLog,
                                         prompt_parts, prompting_mode, rung_key)


def _teacher_batches(tokens: list[int], ref_tokens: list[int], start: int, cap: int):
    """The decodes that teacher-force ``ref_tokens`` after a case's prompt ``tokens`` (sequence 1 from
    position ``start``): lists of (token, position, 1, wants logits), each with at most KLD_CHUNK rows
    of logits and ``cap`` tokens.  Logit rows come out in order: row j predicts ``ref_tokens[j]``."""
    seq = tokens + ref_tokens[:-1]
    first = len(tokens) - 1
    batch: list[tuple[int, int, int, bool]] = []
    n_rows = 0
    for i, tok in enumerate(seq):
        want = i >= first
        batch.append((tok, start + i, 1, want))
        n_rows += want
        if len(batch) == cap or n_rows == KLD_CHUNK:
            yield batch
            batch, n_rows = [], 0
    if batch:
        yield batch


def score_rows(ref: Session, rungs: list[Session], rows: list[int], targets: list[int],
                per_rung: list[tuple[list, list, list]], drafts: list[tuple[list, list]] | None) -> None:
    """Append each rung's KLD, top-1 and delta-p at logit rows ``rows`` of the last decode (row j predicts
    ``targets[j]``) to ``per_rung``, and with ``drafts`` its argmax and top-2 margin there.

    One row at a time, read in place from llama.cpp's logits: every figure of a row depends on that row
    alone (bit for bit the same as in a block of rows), and a row's full-vocabulary temporaries (about
    1 MB each) stay in the CPU's cache, where a block of 64 rows (64 MB each) went through memory: 64 rows
    of 262,144 logits took 4.5-6 s as a block and 0.4-0.6 s row by row (a busy 2-core machine)."""
    for j, i in enumerate(rows):
        block = RefRows(ref.logits(i)[None, :])
        for k, (r, (klds, same, dps)) in enumerate(zip(rungs, per_rung)):
            z = r.logits(i)[None, :]
            d, t, p = block.compare(z, targets[j:j + 1])
            klds += d.tolist()
            same += t.tolist()
            dps += p.tolist()
            if drafts is not None:
                top, margin = top2(z)
                drafts[k][0].extend(top.tolist())
                drafts[k][1].extend(margin.tolist())


def teacher(req: dict, progress) -> dict:
    """KLD and top-1 of every rung against the reference at each of the reference's output positions;
    with ``"generate": true`` also every rung's greedy outputs (``bench.eval_spec``)."""
    import llama_cpp as L

    log = WorkerLog(L, echo=bool(req.get("verbose")))
    ref = Session(L, dict(req, path=req["reference"]), log)
    rungs: list[Session] = []
    entries = [e if isinstance(e, dict) else {"path": e} for e in req["rungs"]]
    keys = [rung_key(e["path"], e.get("cache_type")) for e in entries]
    generate = bool(req.get("generate"))
    try:
        for entry in entries:
            path = entry["path"]
            rungs.append(Session(L, dict(req, path=path, cache_type=entry.get("cache_type"),
                                         flash_attn=entry.get("flash_attn", req.get("flash_attn", "auto"))), log))
            if rungs[-1].n_vocab != ref.n_vocab:
                raise WorkerError(f"{req['reference']} has a {ref.n_vocab}-token vocabulary and {path} "
                                  f"{rungs[-1].n_vocab}: they are not the same model")
        mode, template = prompting_mode(ref, req)
        ref_tokens: dict[str, list[int]] = req["tokens"]
        scores: dict[str, dict[str, dict[str, list]]] = {key: {} for key in keys}
        specs = []
        if generate:
            slots = max(1, int(req.get("slots") or DEFAULT_SLOTS))
            specs = [SpecRung(r, slots, float(req.get("tie_margin", TIE_MARGIN)), bool(req.get("margins")))
                     for r in rungs]
        total = sum(1 for g in req["groups"] for c in g["cases"] if c["id"] in ref_tokens)
        done = 0
        models = [ref] + rungs
        for group in req["groups"]:
            prefix_text, suffix = prompt_parts(ref, group, mode, template)
            prefix = ref.tokenize(prefix_text, add_special=True)
            encoded = [(c, ref.tokenize(c["prompt"] + suffix, add_special=False))
                       for c in group["cases"] if c["id"] in ref_tokens]
            if not encoded:
                continue
            longest = max(len(t) + len(ref_tokens[c["id"]]) for c, t in encoded)
            ref.ensure_context(len(prefix) + longest + 8, 2)
            if specs:       # as the plain path's context: every slot may hold a whole case
                n_slots = min(specs[0].slots, len(encoded))
                longest_gen = max(len(t) + max(int(c["max_tokens"]), len(ref_tokens[c["id"]])) for c, t in encoded)
                for r in rungs:
                    r.ensure_context(len(prefix) + n_slots * (longest_gen + 8) + 8, n_slots + 1)
            else:
                for r in rungs:
                    r.ensure_context(len(prefix) + longest + 8, 2)
            for m in models:
                m.start_prefix(prefix)
            for spec in specs:
                spec.start_group([s.encode("utf-8") for s in group.get("stop", []) if s], len(prefix), n_slots)
            cap = min(m.batch_cap for m in models)
            for case, tokens in encoded:
                out = ref_tokens[case["id"]]
                per_rung = [([], [], []) for _ in rungs]
                drafts = [([], []) for _ in specs]      # per generating rung: argmax and top-2 margin per row
                scored = 0          # logit row j predicts out[j]
                if out:
                    ref.fork_prefix(1)
                    seqs = [spec.acquire() for spec in specs]
                    for r in rungs[len(specs):]:
                        r.fork_prefix(1)
                    for batch in _teacher_batches(tokens, out, len(prefix), cap):
                        ref.decode_entries(batch)
                        for i, r in enumerate(rungs):
                            if specs:
                                specs[i].decode(batch, seqs[i])
                            else:
                                r.decode_entries(batch)
                        rows = [i for i, entry in enumerate(batch) if entry[3]]
                        if not rows:
                            continue
                        targets = out[scored:scored + len(rows)]
                        scored += len(rows)
                        score_rows(ref, rungs, rows, targets, per_rung, drafts if specs else None)
                    for spec, seq, (top, margin) in zip(specs, seqs, drafts):
                        spec.finish_case(case, tokens, seq, out, top, margin)
                else:
                    for spec in specs:
                        spec.empty_case(case, len(prefix) + len(tokens))
                for key, (klds, same, dps) in zip(keys, per_rung):
                    scores[key][case["id"]] = {"kld": klds, "top1": same, "dp": dps}
                done += 1
                progress(f"kld {done}/{total}")
            for spec in specs:
                spec.drain()
        result = {"scores": scores, "prompting": mode, "runtime_version": L.__version__}
        if specs:
            ids = [c["id"] for g in req["groups"] for c in g["cases"]]
            result["outputs"] = {key: spec.result(ids, mode, L.__version__) for key, spec in zip(keys, specs)}
        return result
    finally:
        for m in rungs + [ref]:
            m.close()

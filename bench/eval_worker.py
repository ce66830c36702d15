"""Run an eval suite's prompts through one GGUF, in this process (greedy, prefix-cached).

Run as ``python -m edgequant.bench.eval_worker``: one JSON request on stdin,
one JSON line on stdout (the result, or ``{"error": ...}`` with exit code 1),
progress lines ``progress eval i/n`` on stderr.  The request
(``edgequant.bench.quality`` builds it)::

    {"path": str, "threads": int, "repack": bool|null, "mmap": bool, "seed": int,
     "prompting": "auto"|"chat"|"completion",
     "groups": [{"format": str, "system": str, "few_shot": str, "stop": [str],
                 "cases": [{"id": str, "prompt": str, "max_tokens": int}]}],
     "generate": bool,                 # greedy-decode every case
     "record_topk": int,               # >0: keep the top-k log-probs of every generated step
     "topk_out": str|null,             # where to write them (.npz, written atomically)
     "teacher": {"tokens": {case_id: [token, ...]}, "topk": str}|null}
                                       # score these tokens against the reference's top-k

Method:

* Prompting: ``chat`` renders each case with the model's own chat template
  (GGUF ``tokenizer.chat_template``, through llama.cpp's template engine) as a
  system turn and a user turn; ``completion`` puts the case into the suite's
  few-shot block at ``{prompt}`` (for base models).  ``auto`` uses the chat
  template when the GGUF has one.  The prompts are the same for every rung.
* Prefix reuse: the text before the case (system prompt + few-shot block, or
  the chat template's head) is decoded once per format; each case then drops
  everything after that prefix from the KV cache (``llama_memory_seq_rm``) and
  decodes only its own tokens.  The context keeps a full-size sliding-window
  cache (``swa_full``) so the prefix is never evicted.
* Greedy decoding (argmax of the logits; no sampler, so no seed dependence),
  stopping at an end-of-generation token, at a stop string, or at
  ``max_tokens``.  The raw output bytes are returned (base64): parsers see
  exactly what the model wrote, invalid UTF-8 included.
* Token-level divergence, like ``llama-perplexity --kl-divergence``: the
  reference's own output tokens are teacher-forced through this model after
  the same prompt, and at every output position the KL divergence
  KL(reference || this) and whether both agree on the most likely token are
  computed.  The reference distribution is kept as its top-k log-probs plus
  the remaining mass as one bin, so the KLD is that of the two distributions
  coarsened to k+1 bins: a lower bound of the full-vocabulary KLD that is
  tight when the top-k hold nearly all the mass (k=64 by default).
"""

from __future__ import annotations

import base64
import ctypes
import os
import sys
import time
from typing import Any

import numpy as np

from edgequant.bench.host_worker import Bench, WorkerError, _flash_attn_type, _Log, serve

CASE_MARK = "\u0000EDGEQUANT-CASE\u0000"


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64, copy=False)
    return z - logsumexp(z)


def logsumexp(z: np.ndarray) -> float:
    m = float(z.max())
    return m + float(np.log(np.exp(z - m, dtype=np.float64).sum()))


def top_k(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely tokens (most likely first) and their log-probs, from raw logits."""
    lse = logsumexp(z)
    idx = np.argpartition(z, -k)[-k:]
    idx = idx[np.argsort(z[idx])[::-1]]
    return idx.astype(np.int32), (z[idx].astype(np.float64) - lse).astype(np.float32)


def score_position(ref_ids: np.ndarray, ref_lp: np.ndarray, z: np.ndarray) -> tuple[float, bool]:
    """KLD(ref || this) on the coarsened distributions, and top-1 agreement, from this model's raw logits."""
    lse = logsumexp(z)
    q_lp = z[ref_ids].astype(np.float64) - lse
    return _coarse(ref_lp, q_lp), int(np.argmax(z)) == int(ref_ids[0])


def coarse_kld(ref_ids: np.ndarray, ref_lp: np.ndarray, lp: np.ndarray) -> float:
    """KL(ref || this) over the reference's top-k tokens plus one bin for the rest."""
    return _coarse(ref_lp, lp[ref_ids])


def _coarse(ref_lp: np.ndarray, q_lp: np.ndarray) -> float:
    ref_lp = ref_lp.astype(np.float64)
    p = np.exp(ref_lp)
    kld = float(np.sum(p * (ref_lp - q_lp)))
    p_rest = max(0.0, 1.0 - float(p.sum()))
    q_rest = max(0.0, 1.0 - float(np.exp(q_lp).sum()))
    if p_rest > 1e-12:
        kld += p_rest * (np.log(p_rest) - np.log(max(q_rest, 1e-30)))
    return max(kld, 0.0)


class Session:
    """A loaded model with one context big enough for the longest case."""

    def __init__(self, L, req: dict, log: _Log):
        self.L = L
        self.req = req
        self.log = log
        bench_req = {"path": req["path"], "mmap": req.get("mmap", True), "threads": req["threads"],
                     "repack": req.get("repack"), "seed": req.get("seed", 0)}
        self.bench = Bench(L, bench_req, log, lambda s: None)
        self.bench.load_model()
        self.model = self.bench.model
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.ctx = None
        self.n_ctx = 0

    # -- text <-> tokens ------------------------------------------------------

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self.L.llama_token * cap)()
        n = self.L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, True)
        if n < 0:
            cap = -n
            buf = (self.L.llama_token * cap)()
            n = self.L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, True)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self.L.llama_token_to_piece(self.vocab, token, buf, 256, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.L.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def chat_template(self) -> str | None:
        raw = self.L.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", "replace") if raw else None

    def render_chat(self, template: str, system: str, user: str) -> str:
        L = self.L
        roles = [(b"system", system), (b"user", user)] if system else [(b"user", user)]
        msgs = (L.llama_chat_message * len(roles))()
        keep = []
        for i, (role, content) in enumerate(roles):
            c = content.encode("utf-8")
            keep.append(c)
            msgs[i].role = role
            msgs[i].content = c
        tmpl = template.encode("utf-8")
        size = 4096 + sum(len(c) for c in keep) * 2
        buf = ctypes.create_string_buffer(size)
        n = L.llama_chat_apply_template(tmpl, msgs, len(roles), True, buf, size)
        if n > size:
            buf = ctypes.create_string_buffer(n)
            n = L.llama_chat_apply_template(tmpl, msgs, len(roles), True, buf, n)
        if n < 0:
            raise WorkerError("the model's chat template is not supported by llama.cpp's template engine; "
                              "use prompting = completion")
        return buf.raw[:n].decode("utf-8", "replace")

    # -- context ----------------------------------------------------------------

    def ensure_context(self, n_ctx: int) -> None:
        n_ctx = max(256, -(-n_ctx // 256) * 256)
        if self.ctx is not None and self.n_ctx >= n_ctx:
            return
        L = self.L
        if self.ctx is not None:
            L.llama_free(self.ctx)
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = min(n_ctx, 2048)
        cp.n_ubatch = 512
        cp.flash_attn_type = _flash_attn_type(L, self.req.get("flash_attn", "auto"))
        cp.swa_full = True
        cp.n_threads = cp.n_threads_batch = self.req["threads"]
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise WorkerError(f"cannot create a {n_ctx}-token context for {self.req['path']}: {self.log.last()}")
        self.n_ctx = n_ctx
        self.batch_cap = cp.n_batch

    @property
    def mem(self):
        return self.L.llama_get_memory(self.ctx)

    def decode(self, tokens: list[int], logits_all: bool = False) -> None:
        """Decode tokens after what is in the cache; logits for the last (or every) token."""
        L = self.L
        start = L.llama_memory_seq_pos_max(self.mem, 0) + 1
        for off in range(0, len(tokens), self.batch_cap):
            chunk = tokens[off:off + self.batch_cap]
            last_chunk = off + self.batch_cap >= len(tokens)
            batch = L.llama_batch_init(len(chunk), 0, 1)
            try:
                for i, tok in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = start + off + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1 if (logits_all or (last_chunk and i == len(chunk) - 1)) else 0
                batch.n_tokens = len(chunk)
                rc = L.llama_decode(self.ctx, batch)
            finally:
                L.llama_batch_free(batch)
            if rc != 0:
                raise WorkerError(f"llama_decode returned {rc}: {self.log.last()}")

    def logits(self, i: int) -> np.ndarray:
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def truncate(self, n_keep: int) -> None:
        if not self.L.llama_memory_seq_rm(self.mem, 0, n_keep, -1):
            self.L.llama_memory_clear(self.mem, False)
            raise WorkerError("the KV cache could not drop a case after the shared prefix")


def _prompt_parts(sess: Session, group: dict, mode: str, template: str | None) -> tuple[str, str]:
    """(prefix, suffix): a case's text is prefix + prompt + suffix."""
    if mode == "chat":
        rendered = sess.render_chat(template, group.get("system", ""), CASE_MARK)
        head, _, tail = rendered.partition(CASE_MARK)
        return head, tail
    shot = group.get("few_shot") or "{prompt}"
    if "{prompt}" not in shot:
        shot = shot + "{prompt}"
    head, _, tail = shot.partition("{prompt}")
    system = group.get("system", "")
    return (system + "\n\n" + head if system else head), tail


def run(req: dict, progress) -> dict:
    import llama_cpp as L

    log = _Log(L, echo=bool(req.get("verbose")))
    sess = Session(L, req, log)
    template = sess.chat_template()
    mode = req.get("prompting", "auto")
    if mode == "auto":
        mode = "chat" if template else "completion"
    if mode == "chat" and not template:
        raise WorkerError(f"{req['path']} has no chat template (tokenizer.chat_template); use prompting = completion")

    k = int(req.get("record_topk") or 0)
    teacher = req.get("teacher")
    ref_topk = None
    if teacher:
        with np.load(teacher["topk"]) as z:
            ref_topk = {name: z[name] for name in z.files}
    topk_arrays: dict[str, np.ndarray] = {}
    cases_out: list[dict[str, Any]] = []
    scores: dict[str, dict[str, list]] = {}
    gen_tokens = 0
    gen_seconds = 0.0
    total = sum(len(g["cases"]) for g in req["groups"])
    done = 0

    for group in req["groups"]:
        prefix_text, suffix = _prompt_parts(sess, group, mode, template)
        prefix = sess.tokenize(prefix_text, add_special=True)
        stops = [s.encode("utf-8") for s in group.get("stop", []) if s]
        encoded = [(c, sess.tokenize(c["prompt"] + suffix, add_special=False)) for c in group["cases"]]
        longest = max((len(t) + int(c["max_tokens"]) + len((teacher or {}).get("tokens", {}).get(c["id"], []))
                       for c, t in encoded), default=0)
        sess.ensure_context(len(prefix) + longest + 8)
        L.llama_memory_clear(sess.mem, False)
        sess.decode(prefix)
        n_prefix = len(prefix)
        for case, tokens in encoded:
            cid = case["id"]
            if req.get("generate", True):
                sess.truncate(n_prefix)
                sess.decode(tokens)
                out = bytearray()
                toks: list[int] = []
                top_ids, top_lp = [], []
                stopped = "max_tokens"
                t0 = time.perf_counter()
                for _ in range(int(case["max_tokens"])):
                    z = sess.logits(-1)
                    tok = int(np.argmax(z))
                    if k:
                        ids, lps = top_k(z, k)
                        top_ids.append(ids)
                        top_lp.append(lps)
                    toks.append(tok)
                    if L.llama_vocab_is_eog(sess.vocab, tok):
                        stopped = "eog"
                        break
                    out += sess.piece(tok)
                    hit = next((s for s in stops if s in out), None)
                    if hit is not None:
                        del out[out.index(hit):]
                        stopped = "stop"
                        break
                    sess.decode([tok])
                gen_seconds += time.perf_counter() - t0
                gen_tokens += len(toks)
                if k:
                    topk_arrays[f"{cid}.ids"] = np.stack(top_ids) if top_ids else np.zeros((0, k), np.int32)
                    topk_arrays[f"{cid}.lp"] = np.stack(top_lp) if top_lp else np.zeros((0, k), np.float32)
                cases_out.append({"id": cid, "output_b64": base64.b64encode(bytes(out)).decode("ascii"),
                                  "tokens": toks, "n_prompt": n_prefix + len(tokens), "stopped": stopped})
            if teacher and cid in teacher["tokens"] and f"{cid}.ids" in ref_topk:
                ref_tokens = teacher["tokens"][cid]
                ids, lps = ref_topk[f"{cid}.ids"], ref_topk[f"{cid}.lp"]
                sess.truncate(n_prefix)
                sess.decode(tokens)
                kld, top1 = [], []
                n = min(len(ref_tokens), len(ids))
                if n:
                    first = score_position(ids[0], lps[0], sess.logits(-1))
                    kld.append(first[0])
                    top1.append(first[1])
                if n > 1:
                    sess.decode(ref_tokens[:n - 1], logits_all=True)
                    for j in range(1, n):
                        d, t = score_position(ids[j], lps[j], sess.logits(j - 1))
                        kld.append(d)
                        top1.append(t)
                scores[cid] = {"kld": kld, "top1": top1}
            done += 1
            progress(f"eval {done}/{total}")

    if k and req.get("topk_out"):
        dest = req["topk_out"]
        tmp = f"{dest}.partial-{os.getpid()}.npz"
        np.savez(tmp, **topk_arrays)
        os.replace(tmp, dest)
    if sess.ctx is not None:
        L.llama_free(sess.ctx)
    L.llama_model_free(sess.model)
    return {"cases": cases_out, "scores": scores, "prompting": mode, "gen_tokens": gen_tokens,
            "gen_seconds": gen_seconds, "runtime_version": L.__version__}


def main() -> int:
    return serve(run)


if __name__ == "__main__":
    sys.exit(main())

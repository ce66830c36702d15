"""Run an eval suite's prompts through one GGUF, in this process (greedy, batched, prefix-shared).

Run as ``python -m edgequant.bench.eval_worker``: one JSON request on stdin,
one JSON line on stdout (the result, or ``{"error": ...}`` with exit code 1),
progress lines ``progress eval i/n`` on stderr.  The request
(``edgequant.bench.quality`` builds it)::

    {"path": str, "threads": int, "repack": bool|null, "seed": int,
     "mmap": bool|null,                # null: read a quantized file when repacking is on, else map it
     "prompting": "auto"|"chat"|"completion",
     "slots": int,                     # cases decoded side by side (default 8)
     "groups": [{"format": str, "system": str, "few_shot": str, "stop": [str],
                 "cases": [{"id": str, "prompt": str, "max_tokens": int}]}]}

A ``"cache_type"`` (with ``"flash_attn"``) runs the rung with that K and V
cache type (``bench.cache_types``: a quantized KV cache changes outputs too).

With ``"op": "teacher"`` the request names several rungs and the reference's
outputs are teacher-forced through them (``edgequant.bench.eval_teacher``).

With ``"prefix_lengths": true`` only the vocabulary is loaded and nothing is
decoded: the result is the model's training context (``n_ctx_train``) and the
token length of each format's shared prefix (``prefix_tokens``: the system
prompt or few-shot block before the case, BOS included), the depth at which
an app using these prompts generates (``bench.depths = ["suite"]``).

With ``"prompts_only": true`` nothing is decoded: the result is every case's
whole prompt text and its tokens (``prompts``), for running the same prompts
elsewhere (``edgequant.pipeline.device_quality``).

Method:

* Prompting: ``chat`` renders each case with the model's own chat template
  (GGUF ``tokenizer.chat_template``, through llama.cpp's template engine) as a
  system turn and a user turn; ``completion`` puts the case into the suite's
  few-shot block at ``{prompt}`` (for base models).  ``auto`` uses the chat
  template when the GGUF has one.  The prompts are the same for every rung.
* Prefix sharing: the text before the case (system prompt + few-shot block, or
  the chat template's head) is decoded once per format into sequence 0 of a
  unified KV cache.  Each case runs in a slot (sequence 1..slots) that starts
  as a copy of sequence 0 (``llama_memory_seq_cp``: the cells are shared, not
  recomputed) and decodes only its own tokens.  The context keeps a full-size
  sliding-window cache (``swa_full``) so the prefix is never evicted.
* Batched greedy decoding: up to ``slots`` cases generate side by side, one
  token per case per ``llama_decode`` (continuous batching: a finished case's
  slot takes the next case at once).  A CPU decode step streams the weights
  once for the whole batch, so the suite runs several times faster than one
  case after another, while every case still sees only its own prompt.
  Argmax of the logits (no sampler, no seed dependence); a case stops at an
  end-of-generation token, at a stop string, or at ``max_tokens``.  The raw
  output bytes are returned (base64): parsers see exactly what the model
  wrote, invalid UTF-8 included.
* Token-level divergence, like ``llama-perplexity --kl-divergence``: the
  reference's own output tokens are teacher-forced through the reference GGUF
  and through each rung (all loaded in one process) after the same prompt; at
  every output position the KL divergence KL(reference || rung) over the full
  vocabulary and whether both agree on the most likely token are computed.
  The reference decodes each position once and its distribution is compared
  with every rung's, so its cost does not grow with the ladder.
"""

from __future__ import annotations

import base64
import ctypes
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgequant.bench.host_worker import Bench, WorkerLog, cache_type_id, flash_attn_id
from edgequant.bench.worker import WorkerError, serve

# Where the case goes in a rendered chat template.  No NUL in it: llama_chat_apply_template takes C
# strings, so a NUL ended the user turn there and the case landed after the model's turn had begun.
CASE_MARK = "<<EDGEQUANT-CASE-7f3a>>"
DEFAULT_SLOTS = 8
KLD_CHUNK = 64        # teacher-forced positions per decode: bounds the logits copied at once


def log_softmax_rows(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of raw logits (float32 values, float64 normalizers)."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float32))
    m = z.max(axis=1, keepdims=True)
    shifted = z - m
    lse = np.log(np.exp(shifted).sum(axis=1, keepdims=True, dtype=np.float64))
    return (shifted - lse.astype(np.float32)).astype(np.float32, copy=False)


def kld_rows(ref_logits: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: KL(ref || this) in nats over the full vocabulary, and whether the argmaxes agree."""
    lp = log_softmax_rows(ref_logits)
    lq = log_softmax_rows(logits)
    kld = np.sum(np.exp(lp) * (lp - lq), axis=1, dtype=np.float64)
    same = np.argmax(lp, axis=1) == np.argmax(lq, axis=1)
    return np.maximum(kld, 0.0), same


class RefRows:
    """The reference's full-vocabulary distribution at a block of positions, computed once and compared
    with any number of rungs' logits at the same positions (the same figures as ``kld_rows``)."""

    def __init__(self, ref_logits: np.ndarray):
        self.lp = log_softmax_rows(ref_logits)
        self.p = np.exp(self.lp)
        self.top = np.argmax(self.lp, axis=1)

    def compare(self, logits: np.ndarray, targets: list[int] | None = None):
        """Per row: KL(ref || this) in nats, and whether the argmaxes agree; with ``targets`` (the token
        each row predicts) also delta-p: this model's probability of it minus the reference's."""
        lq = log_softmax_rows(logits)
        if targets is not None:
            rows = np.arange(len(targets))
            tgt = np.asarray(targets)
            dp = np.exp(lq[rows, tgt].astype(np.float64)) - np.exp(self.lp[rows, tgt].astype(np.float64))
        np.subtract(self.lp, lq, out=lq)
        np.multiply(self.p, lq, out=lq)
        kld = lq.sum(axis=1, dtype=np.float64)
        if targets is not None:
            return np.maximum(kld, 0.0), self.top == np.argmax(logits, axis=1), dp
        return np.maximum(kld, 0.0), self.top == np.argmax(logits, axis=1)


FLOAT_FILE_TYPES = {0, 1, 32}      # llama.cpp's general.file_type: all F32, mostly F16, mostly BF16


def float_weights(path: str) -> bool:
    """Whether a GGUF's weights are floats (BF16, F16, F32), which llama.cpp never repacks.

    An eval session maps such a file and reads a quantized one when repacking is on: llama.cpp copies repacked
    weights out of the file, and a mapped file's pages stay resident beside the copy (a 4B Q4_0 loaded in
    4.0 GiB mapped and 2.3 GiB read, in 3.8 s and 7.4 s).  A type this CPU does not repack (Q8_0 on x86) is
    read too: the same memory, a slower load."""
    from edgequant.quantize.gguf_info import BadGGUF, read_gguf_layout

    try:
        return read_gguf_layout(Path(path)).meta.get("general.file_type") in FLOAT_FILE_TYPES
    except (BadGGUF, OSError):
        return False            # llama.cpp's own load says what is wrong with it


class Session:
    """A loaded model with one context: the shared prefix in sequence 0, cases in 1..slots."""

    def __init__(self, L, req: dict, log: WorkerLog):
        self.L = L
        self.req = req
        self.log = log
        bench_req = {"path": req["path"], "mmap": req.get("mmap"), "threads": req["threads"],
                     "repack": req.get("repack"), "seed": req.get("seed", 0),
                     "vocab_only": bool(req.get("prefix_lengths"))}
        self.bench = Bench(L, bench_req, log, lambda s: None)
        if bench_req["mmap"] is None:
            bench_req["mmap"] = not self.bench.repack or float_weights(req["path"])
        self.bench.load_model()
        self.model = self.bench.model
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.ctx = None
        self.n_ctx = 0
        self.n_seq = 0

    def close(self) -> None:
        if self.ctx is not None:
            self.L.llama_free(self.ctx)
            self.ctx = None
        self.L.llama_model_free(self.model)

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

    def ensure_context(self, n_ctx: int, n_seq: int = 1) -> None:
        """A context of at least ``n_ctx`` cells shared by ``n_seq`` sequences (unified KV cache)."""
        n_ctx = max(256, -(-n_ctx // 256) * 256)
        if self.ctx is not None and self.n_ctx >= n_ctx and self.n_seq >= n_seq:
            return
        L = self.L
        if self.ctx is not None:
            L.llama_free(self.ctx)
            self.ctx = None
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = min(n_ctx, 2048)
        cp.n_ubatch = 512
        cp.n_seq_max = n_seq
        cp.kv_unified = True
        cp.flash_attn_type = flash_attn_id(L, self.req.get("flash_attn", "auto"))
        if self.req.get("cache_type"):      # a rung evaluated with a quantized KV cache (bench.cache_types)
            cp.type_k = cp.type_v = cache_type_id(self.req["cache_type"])
        cp.swa_full = True
        cp.n_threads = cp.n_threads_batch = self.req["threads"]
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise WorkerError(f"cannot create a {n_ctx}-token context for {self.req['path']}: {self.log.last()}")
        self.n_ctx, self.n_seq = n_ctx, n_seq
        self.batch_cap = cp.n_batch

    @property
    def mem(self):
        return self.L.llama_get_memory(self.ctx)

    def next_pos(self, seq: int) -> int:
        return self.L.llama_memory_seq_pos_max(self.mem, seq) + 1

    def decode(self, tokens: list[int], seq: int = 0, logits_all: bool = False) -> None:
        """Decode tokens after what sequence ``seq`` holds; logits for the last (or every) token."""
        start = self.next_pos(seq)
        for off in range(0, len(tokens), self.batch_cap):
            chunk = tokens[off:off + self.batch_cap]
            last_chunk = off + self.batch_cap >= len(tokens)
            self.decode_entries([(tok, start + off + i, seq,
                                  logits_all or (last_chunk and i == len(chunk) - 1))
                                 for i, tok in enumerate(chunk)])

    def decode_entries(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) entries."""
        L = self.L
        batch = L.llama_batch_init(len(entries), 0, 1)
        try:
            for i, (tok, pos, seq, want) in enumerate(entries):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1 if want else 0
            batch.n_tokens = len(entries)
            rc = L.llama_decode(self.ctx, batch)
        finally:
            L.llama_batch_free(batch)
        if rc != 0:
            raise WorkerError(f"llama_decode returned {rc}: {self.log.last()}")

    def logits(self, i: int) -> np.ndarray:
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def fork_prefix(self, seq: int) -> None:
        """Make ``seq`` a copy of sequence 0 (the shared prefix), dropping what it held."""
        L = self.L
        L.llama_memory_seq_rm(self.mem, seq, -1, -1)
        if seq != 0:
            L.llama_memory_seq_cp(self.mem, 0, seq, -1, -1)

    def start_prefix(self, tokens: list[int]) -> None:
        L = self.L
        L.llama_memory_clear(self.mem, False)
        self.decode(tokens, seq=0)


def prompt_parts(sess: Session, group: dict, mode: str, template: str | None) -> tuple[str, str]:
    """(prefix, suffix): a case's text is prefix + prompt + suffix."""
    if mode == "chat":
        rendered = sess.render_chat(template, group.get("system", ""), CASE_MARK)
        head, found, tail = rendered.partition(CASE_MARK)
        if not found:
            raise WorkerError("the model's chat template dropped the user turn's text; use prompting = completion")
        return head, tail
    shot = group.get("few_shot") or "{prompt}"
    if "{prompt}" not in shot:
        shot = shot + "{prompt}"
    head, _, tail = shot.partition("{prompt}")
    system = group.get("system", "")
    return (system + "\n\n" + head if system else head), tail


@dataclass
class Slot:
    seq: int
    case: dict
    max_tokens: int
    out: bytearray = field(default_factory=bytearray)
    toks: list[int] = field(default_factory=list)
    pos: int = 0
    stopped: str = ""


class Generator:
    """Continuous batching of one format's cases over the shared prefix."""

    def __init__(self, sess: Session, stops: list[bytes], n_prefix: int, slots: int):
        self.sess = sess
        self.stops = stops
        self.n_prefix = n_prefix
        self.slots = slots

    def _step(self, slot: Slot, z: np.ndarray) -> bool:
        """Take the argmax token; True while the case goes on."""
        return self.take(slot, int(np.argmax(z)))

    def take(self, slot: Slot, tok: int) -> bool:
        """Take ``tok`` as the case's next token (end of generation, stop strings, the token limit);
        True while the case goes on."""
        L, sess = self.sess.L, self.sess
        slot.toks.append(tok)
        if L.llama_vocab_is_eog(sess.vocab, tok):
            slot.stopped = "eog"
            return False
        slot.out += sess.piece(tok)
        hit = next((s for s in self.stops if s in slot.out), None)
        if hit is not None:
            del slot.out[slot.out.index(hit):]
            slot.stopped = "stop"
            return False
        if len(slot.toks) >= slot.max_tokens:
            slot.stopped = "max_tokens"
            return False
        return True

    def _admit(self, seq: int, case: dict, tokens: list[int]) -> Slot | None:
        """Start a case in ``seq``: its prompt after the shared prefix, and its first token."""
        slot = Slot(seq, case, int(case["max_tokens"]))
        if slot.max_tokens <= 0:
            slot.stopped = "max_tokens"
            return slot
        self.sess.fork_prefix(seq)
        self.sess.decode(tokens, seq=seq)
        slot.pos = self.n_prefix + len(tokens)
        self._step(slot, self.sess.logits(-1))
        return slot

    def run(self, encoded: list[tuple[dict, list[int]]], on_done) -> None:
        queue = list(encoded)
        running: list[Slot] = []
        free = list(range(self.slots, 0, -1))
        while queue or running:
            while queue and free:
                case, tokens = queue.pop(0)
                slot = self._admit(free.pop(), case, tokens)
                if slot.stopped:
                    free.append(slot.seq)
                    on_done(slot)
                else:
                    running.append(slot)
            if not running:
                continue
            self.sess.decode_entries([(s.toks[-1], s.pos, s.seq, True) for s in running])
            still = []
            for i, slot in enumerate(running):
                slot.pos += 1
                if self._step(slot, self.sess.logits(i)):
                    still.append(slot)
                else:
                    free.append(slot.seq)
                    on_done(slot)
            running = still


def rung_key(path: str, cache_type: str | None) -> str:
    """How the teacher's result names a rung: its path, and the KV cache type it ran with if not the default."""
    return path if not cache_type else f"{path} [kv={cache_type}]"


def prompting_mode(sess: Session, req: dict) -> tuple[str, str | None]:
    """(the prompting mode, the model's chat template)."""
    template = sess.chat_template()
    mode = req.get("prompting", "auto")
    if mode == "auto":
        mode = "chat" if template else "completion"
    if mode == "chat" and not template:
        raise WorkerError(f"{req['path']} has no chat template (tokenizer.chat_template); use prompting = completion")
    return mode, template


def prompts(sess: Session, req: dict) -> dict:
    """Every case's whole prompt text and the tokens ``run`` decodes for it, without decoding.

    ``run`` tokenizes the shared prefix (with BOS) and the case's own text apart;
    ``whole_tokens`` is the whole text tokenized at once (with BOS), as a
    program given the text (llama-completion) does.  Where the two differ, the
    join between prefix and case tokenizes differently."""
    mode, template = prompting_mode(sess, req)
    out = []
    for group in req["groups"]:
        prefix_text, suffix = prompt_parts(sess, group, mode, template)
        prefix = sess.tokenize(prefix_text, add_special=True)
        for c in group["cases"]:
            text = prefix_text + c["prompt"] + suffix
            out.append({"id": c["id"], "text": text,
                        "tokens": prefix + sess.tokenize(c["prompt"] + suffix, add_special=False),
                        "whole_tokens": sess.tokenize(text, add_special=True)})
    return {"prompting": mode, "prompts": out}


def prefix_lengths(sess: Session, req: dict) -> dict:
    """The training context and each format's shared prefix length in tokens (see the module doc)."""
    mode, template = prompting_mode(sess, req)
    lengths = {g["format"]: len(sess.tokenize(prompt_parts(sess, g, mode, template)[0], add_special=True))
               for g in req["groups"]}
    return {"prompting": mode, "prefix_tokens": lengths, "n_ctx_train": _context_length(sess)}


def _context_length(sess: Session) -> int:
    """The GGUF's ``<arch>.context_length`` (a vocabulary-only load leaves llama_model_n_ctx_train at 0)."""
    L = sess.L

    def meta(key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = L.llama_model_meta_val_str(sess.model, key.encode(), buf, 256)
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    arch = meta("general.architecture")
    value = meta(f"{arch}.context_length") if arch else None
    try:
        return int(value) if value else int(L.llama_model_n_ctx_train(sess.model))
    except ValueError:
        return 0


def run(req: dict, progress) -> dict:
    if req.get("op") == "teacher":
        from edgequant.bench.eval_teacher import teacher

        return teacher(req, progress)
    import llama_cpp as L

    log = WorkerLog(L, echo=bool(req.get("verbose")))
    sess = Session(L, req, log)
    if req.get("prefix_lengths"):
        try:
            return prefix_lengths(sess, req)
        finally:
            sess.close()
    if req.get("prompts_only"):
        try:
            return prompts(sess, req)
        finally:
            sess.close()
    mode, template = prompting_mode(sess, req)

    slots = max(1, int(req.get("slots") or DEFAULT_SLOTS))
    results: dict[str, dict[str, Any]] = {}
    gen_tokens = 0
    gen_seconds = 0.0
    total = sum(len(g["cases"]) for g in req["groups"])
    done = [0]

    try:
        for group in req["groups"]:
            prefix_text, suffix = prompt_parts(sess, group, mode, template)
            prefix = sess.tokenize(prefix_text, add_special=True)
            stops = [s.encode("utf-8") for s in group.get("stop", []) if s]
            encoded = [(c, sess.tokenize(c["prompt"] + suffix, add_special=False)) for c in group["cases"]]
            if not encoded:
                continue
            longest = max(len(t) + int(c["max_tokens"]) for c, t in encoded)
            n_slots = min(slots, len(encoded))
            sess.ensure_context(len(prefix) + n_slots * (longest + 8) + 8, n_slots + 1)
            sess.start_prefix(prefix)

            def finished(slot: Slot) -> None:
                results[slot.case["id"]] = {
                    "id": slot.case["id"], "output_b64": base64.b64encode(bytes(slot.out)).decode("ascii"),
                    "tokens": slot.toks, "n_prompt": None, "stopped": slot.stopped}
                done[0] += 1
                progress(f"eval {done[0]}/{total}")

            t0 = time.perf_counter()
            Generator(sess, stops, len(prefix), n_slots).run(encoded, finished)
            gen_seconds += time.perf_counter() - t0
            for c, t in encoded:
                results[c["id"]]["n_prompt"] = len(prefix) + len(t)
                gen_tokens += len(results[c["id"]]["tokens"])
    finally:
        sess.close()
    cases_out = [results[c["id"]] for g in req["groups"] for c in g["cases"] if c["id"] in results]
    return {"cases": cases_out, "prompting": mode, "gen_tokens": gen_tokens,
            "gen_seconds": gen_seconds, "slots": slots, "runtime_version": L.__version__}


def main() -> int:
    return serve(run)


if __name__ == "__main__":
    sys.exit(main())

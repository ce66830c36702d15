"""A rung's greedy outputs from the teacher pass: speculative verification with the reference's output as the draft.

The teacher pass (``eval_teacher.teacher``) already feeds each case's prompt
plus the reference's output through every rung in batches: logit row j of a
rung is its distribution for output token j given the reference's tokens
before it.  Greedy decoding of the rung would produce exactly the reference's
tokens up to the first position u where the rung's argmax departs from the
reference token, then the rung's own argmax there.  So the rung's output is
taken from that pass up to u, and decoded token by token only from there on,
in the same context: the KV cache the batched pass filled is truncated to the
kept tokens (``llama_memory_seq_rm``) and the prompt is never decoded again.
A rung that agrees with the reference on every position of a case costs no
decode beyond the batched pass.  The continuations of several cases run side
by side (continuous batching, as the plain path does), one token per case per
``llama_decode``.

Stop conditions are the plain path's own: every token, taken from the pass or
decoded, goes through ``Generator.take`` (end of generation, stop strings,
``max_tokens``), on the same prompt tokens (prefix with BOS, then the case).

Near ties.  A batched decode and a single-token decode of the same position
can differ in the last bits of their logits (other kernels, other summation
order), so where the rung's top two logits are within ``tie_margin`` of each
other the batched pass cannot say what plain generation would pick.  At the
first such position (before or at the departure) the pass is trusted no
further: the KV cache is cut one token earlier, that token is decoded again
alone, and the case goes on token by token from there, so plain (single-token)
decoding decides the tie; a near tie on the first output token decodes the
case's prompt again in one batch, as plain generation does.  ``edgequant eval --generation check`` also
generates every rung plainly and reports, per rung, the cases whose outputs
differ and where.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

import numpy as np

from edgequant.bench.eval_worker import Generator, Slot

# Top-2 logit margin below which the batched pass does not decide a position (logits, not probabilities).
# Batched and single-token decodes differ in their last bits, and the difference grows through the layers
# and the KV cache: on the 270M at Q8_0 a position with a margin of 0.044 went the other way in plain
# generation (benchmarks/eval_speed.py --check, 4 cases).  0.1 is a first choice, not a guarantee: the
# check mode counts what still differs and the benchmark prints how many positions each margin would send
# back to plain decoding.
TIE_MARGIN = 0.1


def top2(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of logits: the argmax (the first of equal maxima, as ``np.argmax`` in the plain path) and
    the margin between the two largest values."""
    rows = np.atleast_2d(rows)
    top = np.argmax(rows, axis=1)
    two = np.partition(rows, -2, axis=1)[:, -2:]
    return top, (two[:, 1] - two[:, 0]).astype(np.float64)


def departure(draft: list[int], top: list[int], margin: list[float], tie_margin: float) -> tuple[int, str]:
    """(u, why): the first position whose top-2 margin is below ``tie_margin`` (``near_tie``) or whose
    argmax is not the draft's token (``departs``); ``(len(draft), "agrees")`` when there is none."""
    for j, (d, t, m) in enumerate(zip(draft, top, margin)):
        if m < tie_margin:
            return j, "near_tie"
        if t != d:
            return j, "departs"
    return len(draft), "agrees"


@dataclass
class _SpecSlot(Slot):
    feed: int = -1          # the token decoded next, at ``pos``
    base: int = 0           # position of the first output token (prefix + prompt)
    how: str = ""           # agrees | departs | near_tie
    agreed: int = 0         # output tokens taken from the batched pass before the departure
    single: int = 0         # tokens decoded one at a time
    margin: float | None = None
    margins: list[float] | None = None   # the top-2 margin at every position of the pass (with ``margins``)


class SpecRung:
    """One rung's greedy outputs in the teacher process: the batched pass of each case, then the cases
    that depart from the draft decoded side by side in sequences 1..slots of the rung's context."""

    def __init__(self, sess, slots: int, tie_margin: float = TIE_MARGIN, margins: bool = False):
        self.sess = sess
        self.slots = max(1, slots)
        self.tie_margin = tie_margin
        self.keep_margins = margins
        self.results: dict[str, dict] = {}
        self.seconds = 0.0
        self.running: list[_SpecSlot] = []
        self.free: list[int] = []
        self.gen: Generator | None = None

    def start_group(self, stops: list[bytes], n_prefix: int, n_slots: int) -> None:
        self.drain()
        self.gen = Generator(self.sess, stops, n_prefix, n_slots)
        self.free = list(range(n_slots, 0, -1))

    def acquire(self) -> int:
        """A free sequence holding the shared prefix (continuations run until one frees)."""
        while not self.free:
            self.step()
        seq = self.free.pop()
        self.sess.fork_prefix(seq)
        return seq

    def decode(self, batch: list[tuple[int, int, int, bool]], seq: int) -> None:
        """One batch of the teacher pass, in this rung's sequence ``seq``."""
        t0 = time.perf_counter()
        self.sess.decode_entries([(tok, pos, seq, want) for tok, pos, _, want in batch])
        self.seconds += time.perf_counter() - t0

    def empty_case(self, case: dict, n_prompt: int) -> None:
        """A case with no output tokens (``max_tokens`` <= 0): the plain path decodes nothing either."""
        slot = _SpecSlot(0, case, int(case["max_tokens"]), stopped="max_tokens", base=n_prompt, how="agrees")
        self._record(slot)

    def finish_case(self, case: dict, tokens: list[int], seq: int, draft: list[int],
                    top: list[int], margin: list[float]) -> None:
        """The rung's output of a case whose batched pass (prompt ``tokens`` + ``draft``) is in ``seq``."""
        gen = self.gen
        slot = _SpecSlot(seq, case, int(case["max_tokens"]), base=gen.n_prefix + len(tokens))
        u, slot.how = departure(draft, top, margin, self.tie_margin)
        slot.agreed = u
        slot.margin = float(margin[u]) if u < len(margin) else None
        if self.keep_margins:
            slot.margins = [round(float(m), 5) for m in margin]
        if slot.how == "near_tie" and u == 0:
            # plain generation takes the first token from the case's prompt decoded in one batch: do the same
            t0 = time.perf_counter()
            self.sess.L.llama_memory_seq_rm(self.sess.mem, seq, gen.n_prefix, -1)
            self.sess.decode(tokens, seq=seq)
            slot.single += 1
            going = gen._step(slot, self.sess.logits(-1))
            self.seconds += time.perf_counter() - t0
            if not going:
                self._done(slot)
                return
            slot.feed, slot.pos = slot.toks[-1], slot.base
            self.running.append(slot)
            return
        known = draft[:u] + ([int(top[u])] if slot.how == "departs" else [])
        going = True
        for tok in known:
            going = gen.take(slot, tok)
            if not going:
                break
        if not going:
            self._done(slot)
            return
        # go on from the last known token; at a near tie, cut the cache before it and decode it again, alone
        slot.feed = slot.toks[-1]
        slot.pos = slot.base + len(slot.toks) - 1
        self.sess.L.llama_memory_seq_rm(self.sess.mem, seq, slot.pos, -1)
        self.running.append(slot)

    def step(self) -> None:
        """One token for every running continuation."""
        if not self.running:
            return
        t0 = time.perf_counter()
        self.sess.decode_entries([(s.feed, s.pos, s.seq, True) for s in self.running])
        still = []
        for i, slot in enumerate(self.running):
            slot.pos += 1
            slot.single += 1
            if self.gen._step(slot, self.sess.logits(i)):
                slot.feed = slot.toks[-1]
                still.append(slot)
            else:
                self._done(slot)
        self.running = still
        self.seconds += time.perf_counter() - t0

    def drain(self) -> None:
        while self.running:
            self.step()

    def _done(self, slot: _SpecSlot) -> None:
        self._record(slot)
        self.free.append(slot.seq)

    def _record(self, slot: _SpecSlot) -> None:
        spec = {"how": slot.how, "agreed": slot.agreed, "single": slot.single, "margin": slot.margin}
        if slot.margins is not None:
            spec["margins"] = slot.margins
        self.results[slot.case["id"]] = {
            "id": slot.case["id"], "output_b64": base64.b64encode(bytes(slot.out)).decode("ascii"),
            "tokens": slot.toks, "n_prompt": slot.base, "stopped": slot.stopped, "spec": spec}

    def result(self, case_ids: list[str], prompting: str, runtime_version: str) -> dict:
        """The rung's outputs in the shape of a plain eval worker's result (``eval_worker.run``), plus
        ``speculative``: how many cases took the fast path, departed, or met a near tie."""
        cases = [self.results[cid] for cid in case_ids if cid in self.results]
        hows = [c["spec"]["how"] for c in cases]
        return {"cases": cases, "prompting": prompting, "gen_tokens": sum(len(c["tokens"]) for c in cases),
                "gen_seconds": self.seconds, "slots": self.slots, "runtime_version": runtime_version,
                "speculative": {"cases": len(cases), "agrees": hows.count("agrees"),
                                "departs": hows.count("departs"), "near_tie": hows.count("near_tie"),
                                "single_tokens": sum(c["spec"]["single"] for c in cases),
                                "tie_margin": self.tie_margin}}

"""The eval suite on the phone itself (``edgequant run --device ... --quality-on-device``).

By default a phone run computes quality on the host from the same GGUF bytes.
This module runs the suite through the device's own runner instead, so the
figures include whatever the phone's kernels change (ARM dot products, repacked
weights).  For each device (``quality_rungs_on_device``):

1. The prompts are built on the host by the host eval's own code
   (``eval_worker.prompts``, from the reference GGUF: its chat template or the
   suite's few-shot block), as whole texts, and checked: the host decodes the
   shared prefix (with BOS) and the case apart, llama-completion tokenizes the
   whole text at once (with BOS, special tokens parsed); a case whose two
   tokenizations differ is counted (``prompt_tokens_differ``) and said.
2. One bundle of prompts and one POSIX ``sh`` script go to the run folder; per
   rung, one shell call runs every case with ``llama-completion`` under
   ``timeout`` (greedy: ``--samplers temperature --temp 0``, fixed seed,
   ``-n`` = the format's ``max_tokens``, the stop strings as ``-r`` so the
   phone stops where the host does, ``-bf`` + ``--no-escape`` so the prompt
   bytes arrive verbatim) and appends each output and the tail of its log to
   one results file, length-prefixed and size-capped; one pull brings it back.
3. The results are read as untrusted bytes: lengths are checked, outputs that
   are too large, cut short or not UTF-8 are failed parses, never errors.  The
   stop strings are applied on the host as the host eval applies them, then
   the same parsers and ``compute_metrics`` run against the reference rung's
   outputs generated on the same device.
4. Rows go to the store with the device's ``device_id`` and
   ``params.stage = "quality"``, ``params.where = "device"``.

KLD and top-1 agreement are not computed: llama-completion returns text, not
logits, so the rows omit them and the table says so.  Eval throughput is
sequential (one case at a time, prompt included), unlike the host's batched
figure.
"""

from __future__ import annotations

import posixpath
import re
import signal
import tempfile
import threading
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from edgequant.bench.device_bench import device_repack
from edgequant.bench.parsers import ParseResult
from edgequant.bench.quality import (EvalError, CaseResult, Reference, base_request, call_worker, case_groups,
                                     parse_case, compute_metrics, evaluate_gates)
from edgequant.devices.facts import recommended_threads
from edgequant.devices.transport import DeviceError, quote
from edgequant.pipeline.host import quality_measurements
from edgequant.pipeline.scope import RunScope
from edgequant.profiles.variants import BenchVariant
from edgequant.core.status import RungStatus, classify_exit

OUTPUT_LIMIT = 1 << 20          # bytes of one case's output read back; more is a failed parse
LOG_TAIL = 8192                 # bytes of one case's log read back
EOG_MARK = b" [end of text]\n"  # what llama-completion prints after an end-of-generation token
TOKEN_LEVEL_NOTE = "not measured on the device: llama-completion returns text, not logits"

# $1 = the model, $2 = the results file.  Written for any POSIX sh (mksh on Android).
SCRIPT_HEAD = r"""model=$1 res=$2
if command -v timeout > /dev/null 2>&1; then to=timeout; else to="toybox timeout"; fi
: > "$res.partial" || exit 3
emit() {
  n=$(wc -c < "$5" 2> /dev/null); n=$((n + 0))
  echo "#EQ $1 $2 $3 $4 $n $6" >> "$res.partial"
  cat "$5" >> "$res.partial" 2> /dev/null
  echo >> "$res.partial"
}
one() {
  i=$1 t=$2 off=$3 len=$4; shift 4
  tail -c +$((off + 1)) prompts.bin | head -c "$len" > "p.$i"
  start=$(date +%s)
  $to -k 5 "$t" "$@" -m "$model" -bf "p.$i" > "out.$i" 2> "err.$i" < /dev/null
  rc=$?
  secs=$(($(date +%s) - start))
  full=$(wc -c < "out.$i"); full=$((full + 0))
  head -c OUTPUT_LIMIT "out.$i" > "cut.$i"
  tail -c LOG_TAIL "err.$i" > "tail.$i"
  emit out "$i" "$rc" "$secs" "cut.$i" "$full"
  emit err "$i" "$rc" "$secs" "tail.$i" 0
  rm -f "p.$i" "out.$i" "err.$i" "cut.$i" "tail.$i"
  return $rc
}
finish() { mv "$res.partial" "$res"; exit 0; }
""".replace("OUTPUT_LIMIT", str(OUTPUT_LIMIT)).replace("LOG_TAIL", str(LOG_TAIL))

_HEADER = re.compile(rb"#EQ (out|err) (\d{1,6}) (\d{1,3}) (\d{1,9}) (\d{1,12}) (\d{1,15})")
_PERF = re.compile(r"(prompt eval|\beval) time\s*=\s*([0-9]+(?:\.[0-9]+)?) ms /\s*(\d+) (?:tokens|runs)")


@dataclass
class CaseRun:
    """What came back for one case: llama-completion's exit code, output and the tail of its log."""

    rc: int
    seconds: int
    output: bytes
    full_size: int
    log: bytes = b""

    def log_text(self) -> str:
        return self.log.decode("utf-8", "replace")


@dataclass
class DeviceCase:
    output: bytes
    stopped: str
    n_tokens: int | None
    seconds: float
    parsed: ParseResult | None = None    # set when the output cannot be parsed at all


# ---------------------------------------------------------------------------
# the script and what it returns


def completion_args(tool: list[str], threads: int, n_ctx: int, max_tokens: int, stops: list[str],
                    repack: bool | None, cache_type: str = "f16", flash_attn: str = "auto") -> list[str]:
    """llama-completion's command line for one case (the model and prompt file are added by the script).
    ``cache_type``: the K and V cache type (``-ctk/-ctv``); ``flash_attn`` is passed with it (llama.cpp
    runs a quantized V cache only with flash attention: ``BenchVariant.flash_attn`` says "on" then)."""
    # --swa-full: the host eval's context keeps the full sliding-window cache too
    args = [*tool, "--no-escape", "-no-cnv", "--no-display-prompt", "--no-warmup", "--samplers", "temperature",
            "--temp", "0", "-s", "0", "-n", str(max_tokens), "-c", str(n_ctx), "-t", str(threads), "--swa-full"]
    if cache_type != "f16":
        args += ["-ctk", cache_type, "-ctv", cache_type, "-fa", flash_attn]
    if repack is False:
        args.append("--no-repack")
    for s in stops:
        args += ["-r", s]
    return args


def build_script(lines: list[tuple[int, int, int, int, list[str]]], env: dict[str, str]) -> str:
    """The shell script for one device: (index, offset, length, timeout s, argv) per case."""
    assigns = " ".join(f"{k}={quote(v)}" for k, v in env.items() if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k))
    if assigns:
        assigns = f"export {assigns}\n"
    body = []
    for i, off, length, timeout, argv in lines:
        body.append(f"one {i} {timeout} {off} {length} {' '.join(quote(a) for a in argv)} || finish")
    return SCRIPT_HEAD + assigns + "\n".join(body) + "\nfinish\n"


def read_results(data: bytes, n_cases: int) -> dict[int, CaseRun]:
    """The results file -> case index -> what came back.  Anything malformed ends the reading there."""
    out: dict[int, CaseRun] = {}
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos, pos + 128)
        m = _HEADER.fullmatch(data[pos:nl]) if nl >= 0 else None
        if m is None:
            break
        kind, i, rc, secs, n, full = m.group(1), *(int(g) for g in m.groups()[1:])
        limit = OUTPUT_LIMIT if kind == b"out" else LOG_TAIL
        end = nl + 1 + n
        if i >= n_cases or n > limit or end >= len(data) or data[end:end + 1] != b"\n":
            break
        payload = data[nl + 1:end]
        if kind == b"out":
            out[i] = CaseRun(rc, secs, payload, full)
        elif i in out:
            out[i].log = payload
        pos = end + 1
    return out


def _perf(log: str) -> tuple[int | None, float]:
    """(tokens generated, seconds of prompt + generation) from llama-completion's timings."""
    n_tokens, ms = None, 0.0
    for name, value, count in _PERF.findall(log):
        ms += float(value)
        if name == "eval":
            n_tokens = int(count) + 1     # the last token sampled is never decoded
    return n_tokens, ms / 1000.0


def cut_at_stops(output: bytes, stops: list[bytes]) -> tuple[bytes, bool]:
    """Apply the stop strings as the host eval does while decoding: at the first place any of them is
    complete, cut before it (the earliest ending wins; on a tie, the first in the suite's list)."""
    best = None
    for order, s in enumerate(stops):
        at = output.find(s)
        if s and at >= 0:
            key = (at + len(s), order)
            if best is None or key < best[0]:
                best = (key, at)
    if best is None:
        return output, False
    return output[:best[1]], True


def case_from_run(run: CaseRun, stops: list[bytes]) -> DeviceCase:
    """One case's output as the host eval would have returned it (see the module doc)."""
    n_tokens, seconds = _perf(run.log_text())
    if run.full_size > OUTPUT_LIMIT:
        return DeviceCase(run.output[:4096], "max_tokens", n_tokens, seconds,
                          ParseResult(False, reason=f"output of {run.full_size} bytes is larger than the "
                                                    f"{OUTPUT_LIMIT} bytes read back"))
    out = run.output
    if not out.endswith(b"\n\n"):
        return DeviceCase(out, "max_tokens", n_tokens, seconds,
                          ParseResult(False, reason="llama-completion's output ended early"))
    out = out[:-2]
    stopped = "max_tokens"
    if out.endswith(EOG_MARK):
        out, stopped = out[:-len(EOG_MARK)], "eog"
    out, hit = cut_at_stops(out, stops)
    if hit:
        stopped = "stop"
    return DeviceCase(out, stopped, n_tokens, seconds)


def failure_status(run: CaseRun | None, timeout: int) -> tuple[str, str]:
    """(status, what happened) for a case whose llama-completion did not exit 0."""
    if run is None:
        return "failed", "no result came back"
    last = [ln.strip() for ln in run.log_text().splitlines() if ln.strip()]
    tail = " | ".join(last[-2:])[:300]
    # the script's $? of the `timeout`-wrapped program: 124 when it was stopped at its deadline, 128 + N when
    # signal N killed it (a SIGKILL is also taken when reported as plain 9)
    rc = 128 + signal.SIGKILL if run.rc == signal.SIGKILL else run.rc
    status = classify_exit(rc, timed_out=run.rc == 124 or run.seconds >= timeout, shell=True)
    if status is RungStatus.TIMEOUT:
        return status.value, f"llama-completion took longer than {timeout} s"
    if status is RungStatus.OOM:
        return status.value, "llama-completion was killed (SIGKILL: the low-memory killer)"
    if status is RungStatus.CRASHED:
        return status.value, f"llama-completion died with signal {rc - 128}: {tail}"
    return RungStatus.FAILED.value, f"llama-completion exited with {run.rc}: {tail}"


# ---------------------------------------------------------------------------
# one device


@dataclass
class _Plan:
    order: list[Any]                 # suite cases in script order
    scripts: dict[str, str]          # cache type -> the script (f16 and each of the profile's cache types)
    prompts: bytes
    prompting: str
    differ: list[str]                # case ids whose whole-text tokens differ from the host's
    timeout: int

    @staticmethod
    def script_name(cache_type: str) -> str:
        return "quality.sh" if cache_type == "f16" else f"quality-kv={cache_type}.sh"


def _plan(suite, ref_art, ctx, threads: int, repack: bool | None, prompting: str, timeout: float,
          reporter, settings=None) -> _Plan:
    req = base_request(ref_art.path, suite, 1, None, prompting)
    req["prompts_only"] = True
    data = call_worker(req, timeout, lambda p: None)
    by_id = {p["id"]: p for p in data["prompts"]}
    tool = ctx.remote.tool(_completion_name(ctx))
    per_case = max(30, int(timeout))
    cache_types = ["f16"] + [t for t in (settings.cache_types if settings is not None else ()) if t != "f16"]
    lines: dict[str, list] = {t: [] for t in cache_types}
    blob, order, differ = bytearray(), [], []
    for group in case_groups(suite):
        spec = suite.formats[group["format"]]
        for c in group["cases"]:
            p = by_id[c["id"]]
            text = p["text"].encode("utf-8")
            if p["tokens"] != p["whole_tokens"]:
                differ.append(c["id"])
            n_ctx = max(256, -(-(len(p["whole_tokens"]) + spec.max_tokens + 16) // 256) * 256)
            for t in cache_types:
                flash = BenchVariant(0, t).flash_attn(settings) if settings is not None else "auto"
                argv = completion_args(tool, threads, n_ctx, spec.max_tokens, list(group["stop"]), repack, t, flash)
                lines[t].append((len(order), len(blob), len(text), per_case, argv))
            blob += text
            order.append(next(x for x in suite.cases if x.id == c["id"]))
    if differ:
        reporter.step(f"{ctx.serial}: {len(differ)} prompt(s) tokenize differently as one text than as the host "
                      f"eval's prefix + case ({', '.join(differ[:5])}); their outputs may differ for that reason")
    scripts = {t: build_script(lines[t], ctx.remote.env()) for t in cache_types}
    return _Plan(order, scripts, bytes(blob), data["prompting"], differ, per_case)


def _completion_name(ctx) -> str:
    for name in ("llama-completion", "llama-cli"):
        if (Path(ctx.runner_path) / "bin" / name).is_file():
            return name
    raise EvalError("failed", f"the runner {ctx.runner_path} has no llama-completion (or llama-cli); "
                              f"rebuild it with `edgequant runner build`")


def _run_rung(ctx, plan: _Plan, rundir: str, model: str, quant: str, suite,
              cache_type: str = "f16") -> tuple[dict, int, float]:
    """Every case of one rung on the device -> (case id -> CaseResult, tokens, seconds); EvalError on failure.
    ``cache_type``: run it with that KV cache type (the plan's script for it)."""
    res = posixpath.join(rundir, f"quality-{re.sub(r'[^A-Za-z0-9_.+=-]', '_', quant)}.bin")
    n = len(plan.order)
    shell_timeout = n * (plan.timeout + 10) + 120
    script = quote(plan.script_name(cache_type))
    r = ctx.transport.shell(f"cd {quote(rundir)} && rm -f {quote(res)} && sh {script} {quote(model)} {quote(res)}",
                            shell_timeout)
    if not r.ok:
        raise EvalError("failed", f"the eval script on {ctx.serial} exited with {r.exit_code}: "
                                  f"{(r.stdout + r.stderr).strip()[-300:]}")
    with tempfile.TemporaryDirectory(prefix="edgequant-eval-") as tmp:
        local = Path(tmp) / "results.bin"
        ctx.transport.pull(res, local, timeout=600)
        bound = n * (OUTPUT_LIMIT + LOG_TAIL + 256)
        if local.stat().st_size > bound:
            raise EvalError("failed", f"the eval results from {ctx.serial} are {local.stat().st_size} bytes, "
                                      f"more than the {bound} expected")
        runs = read_results(local.read_bytes(), n)
    ctx.transport.shell(f"rm -f {quote(res)}", 60)
    results: dict[str, CaseResult] = {}
    gen_tokens, gen_seconds = 0, 0.0
    for i, case in enumerate(plan.order):
        run = runs.get(i)
        if run is None or run.rc != 0:
            status, what = failure_status(run, plan.timeout)
            raise EvalError(status, f"case {case.id} of {quant} on {ctx.serial}: {what}")
        spec = suite.formats[case.format]
        dc = case_from_run(run, [s.encode("utf-8") for s in spec.stop if s])
        parsed = dc.parsed or parse_case(case, dc.output, suite)
        cr = CaseResult(case, dc.output, [], dc.stopped, parsed)
        cr.n_tokens = dc.n_tokens      # type: ignore[attr-defined] - read by _record
        results[case.id] = cr
        gen_tokens += dc.n_tokens or 0
        gen_seconds += dc.seconds
    return results, gen_tokens, gen_seconds


def _record(c: CaseResult) -> dict:
    rec = c.record()
    rec["n_tokens"] = getattr(c, "n_tokens", None)
    return rec


def _stored_on_device(store, run_id: str, device_id: str) -> tuple[set[str], set[str]]:
    """(quants whose device quality is stored, quants the bench skipped there) for this run."""
    done = {q for q, d in store.measured(run_id, "quality", "device") if d == device_id}
    skipped = {s["quant"] for s in store.rung_statuses(run_id)
               if s["device_id"] == device_id and s["status"] == "skipped"}
    return done, skipped


# Per device and run: the plan (prompts, script) and the reference's outputs generated there, so
# that the farm, which calls once per rung, generates them once.  Phones run in parallel threads.
_CACHE: dict[tuple, dict[str, Any]] = {}
_CACHE_LOCK = threading.Lock()


def _failed(scope: RunScope, art, ctx, device, runtime_version, params, exc, statuses) -> None:
    key = scope.key(art, device_id=ctx.device_id, device=device, runtime="llama.cpp",
                    runtime_version=runtime_version, params=params)
    scope.record(key, [], status=exc.status, detail=f"quality on device: {exc}")
    statuses[art.quant] = exc.status
    scope.reporter.rung_done(art.quant, exc.status)


def quality_rungs_on_device(scope: RunScope, artifacts, profile, suite, device_ctx, *, prompting: str = "auto",
                            extra_params: dict | None = None,
                            only: set[str] | None = None) -> dict[str, str]:
    """Run the eval suite on one phone for the rungs in ``only`` (default: every rung) and store the figures.

    ``artifacts`` is the whole ladder: the reference's outputs are generated on this phone first (once
    per run and phone, also when its own rows are already stored, e.g. in a resumed run).  Rungs whose
    device quality is already stored, or that the bench skipped as too large for the phone's RAM, are
    not evaluated.  Returns quant -> status ("ok" or how the eval failed); ``DeviceLost`` when the
    phone stops answering.
    """
    from edgequant.pipeline.device_run import DeviceLost

    store, run_id, reporter = scope.store, scope.run_id, scope.reporter
    ctx = device_ctx
    settings = profile.bench
    threads = settings.threads if settings.threads > 0 else recommended_threads(ctx.facts)
    repack = device_repack(settings)
    ref_art = next(a for a in artifacts if a.is_reference)
    done, skipped = _stored_on_device(store, run_id, ctx.device_id)
    todo = [a for a in artifacts if (only is None or a.quant in only) and a.quant not in done | skipped]
    # each rung again with every quantized KV cache type of the profile (``RUNG@kv=TYPE``, -ctk/-ctv, flash
    # attention on for a quantized V cache), judged against the reference's f16-cache outputs on this phone
    kv_todo = [(a, t, BenchVariant(0, t)) for t in settings.cache_types if t != "f16" for a in artifacts
               if (only is None or a.quant in only) and a.quant not in skipped
               and BenchVariant(0, t).name(a.quant) not in done]
    if not todo and not kv_todo:
        return {}
    key = (ctx.device_id, run_id, ref_art.sha256, suite.sha256, prompting)
    with _CACHE_LOCK:
        state = _CACHE.setdefault(key, {})
    rundir = posixpath.join(ctx.workdir, "runs", run_id)
    device = ctx.device_record()
    runtime_version = metadata.version("llama-cpp-python")
    statuses: dict[str, str] = {}
    doing = "preparing the eval"
    try:
        if "plan" not in state:
            try:
                state["plan"] = _plan(suite, ref_art, ctx, threads, repack, prompting, settings.timeout, reporter,
                                      settings)
            except EvalError as exc:
                for art in todo + [replace(a, quant=v.name(a.quant), is_reference=False) for a, _, v in kv_todo]:
                    _failed(scope, art, ctx, device, runtime_version,
                            {"runner": "device", "stage": "quality", "where": "device"}, exc, statuses)
                return statuses
        plan: _Plan = state["plan"]
        params = {"runner": "device", "stage": "quality", "where": "device", "tool": _completion_name(ctx),
                  "suite": suite.name, "suite_sha256": suite.sha256, "prompting": plan.prompting,
                  "threads": threads, "repack": repack if repack is not None else "default", "decoding": "greedy",
                  "n_cases": len(suite.cases), "token_level": TOKEN_LEVEL_NOTE,
                  "prompt_tokens_differ": len(plan.differ), **(extra_params or {})}
        files = [("prompts.bin", plan.prompts)] + [(plan.script_name(t), text.encode("utf-8"))
                                                     for t, text in plan.scripts.items()]
        with tempfile.TemporaryDirectory(prefix="edgequant-eval-") as tmp:
            for name, data in files:
                (Path(tmp) / name).write_bytes(data)
            ctx.transport.shell(f"mkdir -p {quote(rundir)}", 60)
            for name, _ in files:
                ctx.transport.push(Path(tmp) / name, posixpath.join(rundir, name), timeout=600)
        need_ref = "reference" not in state and ref_art.quant not in skipped
        order = ([(ref_art, None)] if need_ref or ref_art in todo else []) + \
            [(a, None) for a in todo if not a.is_reference] + [(a, v) for a, _, v in kv_todo]
        for base, variant in order:
            # a KV-cache variant: the rung's own file, stored under its variant's name and parameters
            art = base if variant is None else replace(base, quant=variant.name(base.quant), is_reference=False)
            mine = art in todo or variant is not None
            doing = f"pushing {base.quant}"
            pushed = ctx.pusher.push(base.path, base.sha256, name=f"{base.quant}.gguf")
            doing = f"evaluating {art.quant}"
            row_key = scope.key(art, device_id=ctx.device_id, device=device, runtime="llama.cpp",
                                runtime_version=runtime_version,
                                params=params if variant is None else variant.params(params, settings))
            reporter.rung_started(art.quant)
            reporter.rung_phase(art.quant, f"eval: {len(plan.order)} cases on {ctx.serial}")
            try:
                if art is ref_art and not need_ref:
                    ref = state["reference"]
                    if ref is None:
                        raise EvalError("failed", f"the reference {art.quant} could not be evaluated on "
                                                  f"{ctx.serial} earlier in this run")
                    results, gen_tokens, gen_seconds = ref.cases, ref.gen_tokens, ref.gen_seconds
                else:
                    results, gen_tokens, gen_seconds = _run_rung(ctx, plan, rundir, pushed.remote, art.quant, suite,
                                                                 variant.cache_type if variant else "f16")
            except EvalError as exc:
                if art is ref_art:
                    state["reference"] = None     # the rungs are compared with nothing
                if mine:
                    _failed(scope, art, ctx, device, runtime_version, row_key.params, exc, statuses)
                continue
            if art is ref_art:
                state["reference"] = Reference(quant=art.quant, sha256=art.sha256, path=art.path, cases=results,
                                               tokens={}, prompting=plan.prompting, gen_tokens=gen_tokens,
                                               gen_seconds=gen_seconds)
            if not mine:
                reporter.rung_done(art.quant, "reference outputs")
                continue
            metrics = compute_metrics(suite, results, state.get("reference"), art.is_reference, gen_tokens,
                                      gen_seconds)
            for m in metrics:
                if m.metric == "eval_tg_tps":
                    m.detail = {"seconds": gen_seconds, "slots": 1,
                                "source": "llama-completion timings, one case at a time, prompts included"}
            gates = evaluate_gates(suite, metrics)
            stored = store.record_rung(run_id, row_key, quality_measurements(metrics, gates), status=None,
                                       cases=[_record(c) for c in results.values()], suite=suite.name)
            statuses[art.quant] = stored or "ok"    # "failed": a figure was not finite (the store says which)
            reporter.rung_done(art.quant, stored or "ok")
    except DeviceError as exc:
        raise DeviceLost(ctx.serial, doing, exc) from None
    return statuses

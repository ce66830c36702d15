"""Option builders shared by several commands, and the small helpers that turn their values into library objects."""

from __future__ import annotations

import shlex
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import click

from edgequant.core.errors import BadInput
from edgequant.core.paths import cache_dir as default_cache, default_db


FORMATS = ("table", "json", "csv", "md")


def db_option(f):
    return click.option("--db", metavar="PATH|URL", default=None,
                        help="Results database: a SQLite file, or postgresql://user@host/db for a store shared "
                             "by several hosts. Default: $EDGEQUANT_DB or ~/.local/share/edgequant/results.db.")(f)


def cache_option(f):
    return click.option("--cache-dir", metavar="DIR", default=None, type=click.Path(file_okay=False),
                        help="Where checkpoints and GGUF artifacts are cached. Default: $EDGEQUANT_CACHE_DIR "
                             "or ~/.cache/edgequant.")(f)


def device_dir_option(f):
    return click.option("--device-dir", metavar="DIR", default=None,
                        help="Work directory on the device. Default: $EDGEQUANT_DEVICE_DIR or "
                             "/data/local/tmp/edgequant (Linux boards without /data need another).")(f)


def runner_dir_option(f):
    return click.option("--runner-dir", type=click.Path(file_okay=False), default=None,
                        help="Prebuilt on-device runner folder (bin/llama-bench, lib/). Default: a cached build that "
                             "runs on the device, else one is built (`edgequant runner build`).")(f)


def model_options(f):
    f = click.option("--profile", "profile_name", default="default", show_default=True, metavar="NAME|PATH",
                     help="Quant profile: a built-in name (default, quick) or a path to a TOML file.")(f)
    f = click.option("--model", default=None, metavar="PATH|HF_REPO",
                     help="bf16 Hugging Face checkpoint folder, or a hub id (downloaded only when named). "
                          "Default: the embedded Gemma 3 270M.")(f)
    return f


def bench_overrides(f):
    f = click.option("--warmup", type=int, default=None, help="Warm-up runs before measuring (profile's bench.warmup).")(f)
    f = click.option("-r", "--repetitions", type=int, default=None,
                     help="Measured repetitions per test, at least 3 (profile's bench.repetitions).")(f)
    f = click.option("-n", "--n-gen", type=int, default=None,
                     help="Tokens generated in the tg test (profile's bench.n_gen, llama-bench -n).")(f)
    f = click.option("-p", "--n-prompt", type=int, default=None,
                     help="Prompt tokens in the pp test (profile's bench.n_prompt, llama-bench -p).")(f)
    f = click.option("-t", "--threads", type=int, default=None,
                     help="CPU threads; 0 = one per physical core (profile's bench.threads).")(f)
    return f


def cache_root(cache_dir: str | None, writable: bool = True) -> Path:
    """The cache folder, made if missing and checked writable: a read-only one is refused before any work."""

    root = Path(cache_dir).expanduser() if cache_dir else default_cache()
    if not writable:
        return root
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise BadInput(f"cache folder {root} cannot be written ({exc.strerror or exc}); make it writable or pass "
                       f"--cache-dir on a writable disk") from None
    return root


def open_store(db: str | None):
    from edgequant.results.store import Store

    return Store(db or default_db())


def force_option(f):
    return click.option("--force", is_flag=True,
                        help="With --resume: take over a run that still looks running (its heartbeat is recent) "
                             "when you know its process is gone. A run whose process is gone on this host, or "
                             "silent for 10 minutes on another, is taken over without it.")(f)


def no_wait_option(f):
    return click.option("--no-wait", is_flag=True,
                        help="If another edgequant is measuring on this host, exit (code 2) instead of waiting "
                             "for it: two runs at once slow each other's figures.")(f)


def host_measuring(cache: Path, no_wait: bool, console, needed: bool = True):
    """The host's measuring lock (``leases.measuring_on_host``) for this command; a no-op when ``needed`` is
    false (only phones measure)."""

    from edgequant.devices import leases

    if not needed:
        return nullcontext()
    return leases.measuring_on_host(cache, command_line(), no_wait,
                                    on_wait=lambda m: console.print(f"[yellow]•[/yellow] {m}"))


def check_host_threads(profile, option: str = "--threads") -> None:
    """More threads than this host has logical CPUs only measures the scheduler: refused."""
    from edgequant.pipeline.run import check_host_threads as check

    check(profile, option)


def quality_options(f):
    f = click.option("--prompting", type=click.Choice(["auto", "chat", "completion"]), default="auto",
                     show_default=True,
                     help="How the suite's prompts are given: the model's chat template (chat), the suite's "
                          "few-shot block as a completion prompt for base models (completion), or chat when "
                          "the GGUF has a template (auto).")(f)
    f = click.option("--suite", "suite_name", default="triage", show_default=True, metavar="NAME|PATH",
                     help="Eval suite: a built-in name (triage) or a path to a suite TOML.")(f)
    return f


def calibration_suite_option(f):
    return click.option("--suite", "suite_name", default="triage", show_default=True, metavar="NAME|PATH",
                        help="Eval suite whose calibration half computes the importance matrix of the "
                             "profile's +imatrix rungs (unused otherwise).")(f)


def suite_for(name: str, profile=None):
    """The eval suite, with the profile's ``[quality] gates`` added (those the suite can measure)."""
    from edgequant.profiles.suites import load_suite

    suite = load_suite(name)
    return suite.with_gates(profile.quality_gates) if profile is not None else suite


def profile_for(name: str, **overrides):
    from edgequant.profiles import load_profile, with_bench_overrides

    return with_bench_overrides(load_profile(name), **overrides)


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["edgequant", *sys.argv[1:]])


def stored_options(ctx, command: click.Command, store, resume_id: str) -> tuple[dict, dict]:
    """(the run, the options it was started with) for ``--resume RUN_ID``: its stored command line, parsed
    again by ``command``, which must be the command that made it."""
    stored = store.run(resume_id)
    argv = shlex.split(stored["command"])
    if argv[1:2] != [command.name]:
        made_by = " ".join(argv[:2]) or "an unknown command"
        raise BadInput(f"run {stored['run_id']} was made by `{made_by}`, not `edgequant {command.name}`; "
                       f"resume it with `{made_by} --resume {stored['run_id']}`")
    try:
        again = command.make_context(command.name, argv[2:], parent=ctx.parent, resilient_parsing=False)
    except click.ClickException as exc:
        raise BadInput(f"run {stored['run_id']}: its stored command line cannot be parsed again "
                       f"({exc.format_message()}); start a new run") from None
    params = dict(again.params)
    if params.get("resume_id"):
        raise BadInput(f"run {stored['run_id']} was itself a resume; resume the run it names")
    return stored, params


def start_or_resume(store, resume_id: str | None, profile, resolved, force: bool = False) -> str:
    """A new run's id, or ``resume_id`` marked running again (``pipeline.run.start_or_resume``; a takeover
    is said in one line)."""
    from edgequant.pipeline.run import start_or_resume as start

    return start(store, resume_id, profile, resolved, command_line(), force, takeover_notice)


def takeover_notice(message: str) -> None:
    click.echo(f"edgequant: {message}", err=True)

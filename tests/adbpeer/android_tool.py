"""The Android command-line tools of the peer's fixture ``bin/`` folder.

One multi-call script, installed under several names (getprop, dumpsys,
toybox, df) with ``STATE`` pointing at the peer's state folder.  It answers
from files there, which the peer (and so a test) rewrites at any time:

    state/props.json          getprop
    state/dumpsys/NAME.txt    dumpsys NAME
    state/disk.json           df (absent: the host's df runs instead)

``toybox time [-pv] CMD...`` runs CMD for real and prints toybox's report
(measured with wait4), passing CMD's exit code through as toybox does.
Other toybox applets run the host's tool of that name.

Runs with ``python -I -S``: standard library only.
"""

import json
import os
import sys
import time

STATE = os.environ.get("ADBPEER_STATE", "")   # replaced at install time
HOST_DF = ""                                  # replaced at install time


def _read_json(name, default):
    try:
        with open(os.path.join(STATE, name), encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return default


def getprop(args):
    props = _read_json("props.json", {})
    args = [a for a in args if not a.startswith("-")]
    if not args:
        out = "".join(f"[{key}]: [{props[key]}]\n" for key in sorted(props))
        sys.stdout.write(out)
        return 0
    value = props.get(args[0])
    if value is None or value == "":
        value = args[1] if len(args) > 1 else ""
    sys.stdout.write(value + "\n")
    return 0


def dumpsys(args):
    folder = os.path.join(STATE, "dumpsys")
    names = sorted(n[:-4] for n in os.listdir(folder) if n.endswith(".txt")) if os.path.isdir(folder) else []
    if not args or args[0] == "-l":
        sys.stdout.write("Currently running services:\n" + "".join(f"  {n}\n" for n in names))
        return 0
    name = args[0]
    if name not in names:
        sys.stderr.write(f"Can't find service: {name}\n")
        return 0
    with open(os.path.join(folder, name + ".txt"), encoding="utf-8") as fh:
        sys.stdout.write(fh.read())
    return 0


def _human(kib):
    value = float(kib)
    for unit in ("K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if value >= 10 else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.0f}T"


def df(args):
    disk = _read_json("disk.json", None)
    if disk is None:
        if not HOST_DF:
            sys.stderr.write("df: no host df\n")
            return 1
        os.execv(HOST_DF, [HOST_DF] + args)
    human = any(a.startswith("-") and "h" in a for a in args)
    total = disk["total"] // 1024
    free = min(disk["free"], disk["total"]) // 1024
    used = total - free
    pct = (used * 100 + total - 1) // total if total else 0
    if human:
        sys.stdout.write("Filesystem      Size  Used Avail Use% Mounted on\n")
        sys.stdout.write(f"{disk['filesystem']:<15} {_human(total):>5} {_human(used):>5} {_human(free):>5} "
                         f"{pct:>3}% {disk['mount']}\n")
    else:
        sys.stdout.write("Filesystem      1K-blocks     Used Available Use% Mounted on\n")
        sys.stdout.write(f"{disk['filesystem']:<15} {total:>9} {used:>8} {free:>9} {pct:>3}% {disk['mount']}\n")
    return 0


def toybox_time(args):
    flags = ""
    while args and args[0].startswith("-") and len(args[0]) > 1 and set(args[0][1:]) <= set("pv"):
        flags += args.pop(0)[1:]
    if not args:
        sys.stderr.write("time: Needs 1 argument\n")
        return 1
    verbose, posix = "v" in flags, "p" in flags
    start = time.monotonic_ns()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(args[0], args)
        except OSError as exc:
            os.write(2, f"time: exec {args[0]}: {exc.strerror}\n".encode())
        os._exit(127)
    _, status, ru = os.wait4(pid, 0)
    elapsed = time.monotonic_ns() - start
    any_flag = bool(flags)
    secs = [elapsed // 1_000_000_000, int(ru.ru_utime), int(ru.ru_stime)]
    frac = [(elapsed % 1_000_000_000) // (1000 if any_flag else 1_000_000),
            round((ru.ru_utime % 1) * 1e6), round((ru.ru_stime % 1) * 1e6)]
    width = 6 if any_flag else 3
    labels = ["Real", "User", "System"] if verbose else ["real" if posix else "\nreal", "user", "sys"]
    sep = " " if any_flag else "\t"
    out = "".join(f"{labels[i]}{' time (s):' if verbose else ''}{sep}{secs[i]}.{frac[i]:0{width}d}\n"
                  for i in range(3))
    if verbose:
        out += (f"Max RSS (KiB): {ru.ru_maxrss}\nMajor faults: {ru.ru_majflt}\n"
                f"Minor faults: {ru.ru_minflt}\nFile system inputs: {ru.ru_inblock}\n"
                f"File system outputs: {ru.ru_oublock}\nVoluntary context switches: {ru.ru_nvcsw}\n"
                f"Involuntary context switches: {ru.ru_nivcsw}\n")
    os.write(2, out.encode())
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else os.WTERMSIG(status)


def toybox(args):
    if not args:
        sys.stdout.write("getprop dumpsys df time (others: the host's tools)\n")
        return 0
    applet, rest = args[0], args[1:]
    if applet == "time":
        return toybox_time(rest)
    if applet in TOOLS:
        return TOOLS[applet](rest)
    try:
        os.execvp(applet, [applet] + rest)
    except OSError:
        sys.stderr.write(f"toybox: Unknown command {applet}\n")
        return 127


TOOLS = {"getprop": getprop, "dumpsys": dumpsys, "df": df, "toybox": toybox}


def main():
    name = os.path.basename(sys.argv[0])
    tool = TOOLS.get(name)
    if tool is None:
        sys.stderr.write(f"android_tool: unknown tool name {name}\n")
        return 127
    try:
        return tool(sys.argv[1:])
    except BrokenPipeError:
        return 141


if __name__ == "__main__":
    sys.exit(main())

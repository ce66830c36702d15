"""``edgequant devices``: the phones this host can reach, and cleaning their work directories."""

from __future__ import annotations

import json

import click

from edgequant.cli.app import cli
from edgequant.cli.options import device_dir_option
from edgequant.core.errors import BadInput


@cli.group(invoke_without_command=True)
@click.option("--device", "device_specs", multiple=True, metavar="SPEC",
              help="Only these devices: SERIAL, HOST:PORT (direct adbd over TCP), server:SERIAL (through the "
                   "adb server), host, or all. Repeatable. Default: every device the adb server knows, plus "
                   "$EDGEQUANT_DEVICES (comma-separated specs).")
@click.option("--json", "as_json", is_flag=True, help="Print the devices as JSON instead of a table.")
@device_dir_option
@click.pass_context
def devices(ctx, device_specs, as_json, device_dir):
    """List reachable phones: model, SoC, ABI, Android, RAM, CPU clusters, free space, thermal, battery.

    Facts come from one shell round-trip per device (getprop, /proc/meminfo,
    cpufreq policies, df of the work directory, dumpsys thermalservice and
    battery).  `threads` is the number of big cores (every core outside the
    slowest cluster), the default thread count on that device.  `edgequant devices clean SERIAL` removes
    edgequant's files from a device.
    """
    if ctx.invoked_subcommand is not None:
        return

    from edgequant.devices import listing
    from edgequant.devices.select import device_dir as resolve_device_dir

    entries = listing.survey(device_specs, resolve_device_dir(device_dir))
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 180))
        listing.render_table(entries, console)
    failed = listing.failure(entries)
    if failed is not None:
        raise failed


@devices.command()
@click.argument("serial", metavar="SERIAL")
@device_dir_option
def clean(serial, device_dir):
    """Remove edgequant's files (pushed models, tools, partial pushes) from a device's work directory.

    SERIAL is any device spec (SERIAL, HOST:PORT, server:SERIAL).  Only what
    edgequant put there is removed, from a work directory carrying its marker;
    system and shared folders (/, /data, /sdcard, ...) are refused.
    """
    from edgequant.devices import push, select

    workdir = select.device_dir(device_dir)
    push.check_workdir(workdir)
    targets = select.resolve([serial])
    if len(targets) != 1 or not isinstance(targets[0], select.Target):
        raise BadInput(f"`devices clean` takes one device, not {serial!r}")
    transport = select.open_transport(targets[0])
    try:
        freed = push.clean(transport, workdir)
    finally:
        transport.close()
    click.echo(f"removed edgequant's files from {workdir} on {targets[0].serial} ({freed / 1024:,.1f} MiB)")

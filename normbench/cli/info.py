"""``normbench info``: what this machine offers the norm layers."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the information as JSON.")
@click.option("--no-bandwidth", is_flag=True, help="Skip the copy-bandwidth measurement.")
def info(as_json: bool, no_bandwidth: bool) -> None:
    """Torch version, devices, the dtypes each device runs the norm layers in, CPU threads and
    the measured copy bandwidth of each device."""
    from normbench.info import run

    data = run(measure_bandwidth=not no_bandwidth)
    if as_json:
        click.echo(json.dumps(data, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]normbench[/] {data['normbench_version']}  torch {data['torch_version']}  "
                  f"python {data['python_version']}")
    table = Table("device", "name", "threads", "norm-layer dtypes", "copy GB/s (read+write)")
    for dev in data["devices"]:
        bw = dev.get("copy_gbps")
        table.add_row(
            dev["device"],
            dev["name"],
            str(dev.get("threads", "")),
            ", ".join(dev["dtypes"]) + ("" if not dev["unsupported"] else
                                          f"  [dim](not: {', '.join(dev['unsupported'])})[/]"),
            "-" if bw is None else f"{bw:.1f}",
        )
    console.print(table)

"""``normbench plot``: draws results. With no subcommand (or options only) it runs
``plot equivalence``; ``plot profile FILE`` and ``plot stability FILE`` draw the other commands'
results files."""

from __future__ import annotations

import click

DEFAULT_SUBCOMMAND = "equivalence"


class _DefaultGroup(click.Group):
    """A group that runs :data:`DEFAULT_SUBCOMMAND` when the first argument names no subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = [DEFAULT_SUBCOMMAND, *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultGroup)
def plot() -> None:
    """Run and draw the weight-norm / learning-rate equivalence experiments (the default), or draw
    a results file of `profile` or `stability`."""


def register_subcommands() -> None:
    """Each command module adds its plot subcommand here (one line each)."""
    from normbench.cli.profile import plot_profile

    plot.add_command(plot_profile)
    from normbench.cli.plot_equivalence import equivalence

    plot.add_command(equivalence)
    from normbench.cli.plot_halfprec import halfprec

    plot.add_command(halfprec)
    from normbench.cli.stability import plot_stability

    plot.add_command(plot_stability)
    from normbench.cli.compare import plot_compare

    plot.add_command(plot_compare)

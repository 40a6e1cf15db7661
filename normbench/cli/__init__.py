"""The ``normbench`` command line: a click group whose commands only parse, call the library and
render. Each command lives in a module of its own beside this one.

Errors are turned into exits in one place, :meth:`_Group.main`: a :class:`~normbench.errors.UserError`
from the library or a click usage error becomes one line on stderr and exit code 2; otherwise the
process exits with what the command returned, which for the commands that record cells is
:func:`normbench.cli.outcome.finish` of their records (1 when a cell ended in an error or a
``--fail-on`` threshold tripped, else 0).
"""

from __future__ import annotations

import sys

import click

from normbench import __version__
from normbench.errors import UserError


class _Group(click.Group):
    """A click group that reports every user error as one line and exit code 2, and exits with
    the code a command returns (an int; None is 0)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        from normbench.results import forget_opened_results, opened_results

        forget_opened_results()
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            files = opened_results()  # only a command that writes --output has its cells on disk
            click.echo(f"Aborted: every finished cell is in the output file {files[-1]}." if files else "Aborted.",
                       err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except UserError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="normbench")
def main() -> None:
    """normbench: speed, numerical stability and training behaviour of normalization layers
    (L2, L1, L-inf and top-k batch-norm; LayerNorm, RMSNorm and GroupNorm families)."""


def _register() -> None:
    """One line per command; each command module imports the library lazily, inside the command."""
    from normbench.cli.compare import compare
    from normbench.cli.info import info
    from normbench.cli.plot import plot, register_subcommands
    from normbench.cli.profile import profile
    from normbench.cli.stability import stability

    main.add_command(info)
    main.add_command(profile)
    main.add_command(stability)
    main.add_command(compare)
    register_subcommands()
    main.add_command(plot)


_register()

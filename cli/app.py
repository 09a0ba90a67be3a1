"""The typer app, its consoles and the error handling every command shares."""

import logging
import os

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from metanet import __version__
from metanet.errors import MetanetError

# OpenMP threads that sleep instead of spinning while they wait (read when torch first loads, inside a command):
# with another busy process on the cores, spinning made SmolLM2's small matmuls about 30× slower. Set it to
# ACTIVE in the environment to keep OpenMP's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class MetanetGroup(TyperGroup):
    """Turns a MetanetError anywhere below into one `error: …` line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MetanetError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=MetanetGroup,
    no_args_is_help=True,
    add_completion=False,
    help="Turn dense transformer FFNs into Mixture-of-Experts with a graph metanetwork.",
)


def _version(value: bool) -> None:
    if value:
        console.print(f"metanet {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="-v logs progress messages, -vv debug messages."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level={0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG),
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
        force=True,
    )


def progress_bar():
    """A transient rich progress bar on stderr (silent when stderr is not a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,
    )

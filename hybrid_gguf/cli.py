"""The `hybrid-gguf` command line: a thin skin over the Python API.

Each subcommand lives in `hybrid_gguf/commands/<name>.py` and exposes
`register(app)`. User-facing failures raise `HybridError`; `main` turns them
into one red line and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console
from rich.text import Text

from hybrid_gguf.errors import HybridError

app = typer.Typer(
    name="hybrid-gguf",
    help="Run MoE GGUF models with hot experts on the GPU and cold experts on the CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

err_console = Console(stderr=True)

_COMMAND_MODULES = ("run", "inspect", "profile", "plan", "bench", "serve", "status", "backend", "doctor")


def _version_callback(value: bool) -> None:
    if value:
        from hybrid_gguf import __version__

        typer.echo(f"hybrid-gguf {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    """Run MoE GGUF models with hot experts on the GPU and cold experts on the CPU."""


def _register_commands() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"hybrid_gguf.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hybrid_gguf.commands.{name}":
                continue  # command not written yet
            raise
        module.register(app)


_register_commands()


# llama.cpp's GGML_ASSERT/GGML_ABORT, should one slip past the checks, ends the CLI with
# one "error: llama.cpp aborted: ..." line and this status (not SIGABRT and a gdb backtrace).
ABORT_EXIT_STATUS = 3


def one_line(message: str) -> str:
    """A message as one printable line: newlines and control characters from file
    contents (tensor names, keys) are escaped, never printed raw."""
    text = " ".join(str(message).splitlines())
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def print_error(message: str) -> None:
    err_console.print(Text.assemble(("error:", "bold red"), " ", one_line(message)), soft_wrap=True)


def main() -> None:
    from hybrid_gguf.llama.log import set_abort_exit_status

    set_abort_exit_status(ABORT_EXIT_STATUS)
    try:
        status = app(standalone_mode=False)
        if type(status) is int and status:
            sys.exit(status)  # a command's typer.Exit(n): click hands it back as a return value
    except HybridError as exc:
        print_error(str(exc))
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:
        # the system's word on a path the checks let through (a name too long, no space left,
        # no permission): one line, like every other refusal
        where = f": {exc.filename}" if exc.filename is not None else ""
        print_error(f"{exc.strerror or exc}{where}"[:2000])
        sys.exit(2)
    except Exception as exc:
        # click's usage errors (typer vendors click, so match by shape, not by class)
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()

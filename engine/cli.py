"""What every command line of memdiff shares: one error boundary and the option types that check
input before any work starts.

    if __name__ == "__main__":
        run(main)                      # tools/<name>: click command -> one-line errors, exit status 2

    @click.option("--guidance", type=Finite(min=0))        # NaN, inf and -5 refused while parsing
    @click.option("--device", type=DEVICE)                 # "cuda" without a GPU refused while parsing
    @click.option("--out", type=OutputFolder())            # an unwritable folder refused while parsing

The boundary turns our errors (ValueError and its kin: bad rows, keys, files, non-finite results;
OSError: unreadable input, unwritable output; click's usage errors) into ONE line on stderr,
`error: <file, row or key>: <problem>`, capped so that an echoed input (a 2 MB prompt) cannot make
a 4 MB line, and exits with status 2. Anything else is a bug and keeps its traceback; so does any
error when MEMDIFF_TRACEBACK=1 is set (for us, debugging).

It lives in engine (not tools/) because engine/train.py is an entry point too and shares
`one_line`; tools import it like any engine module.
"""
from __future__ import annotations

import math
import os
import sys

import click
import torch
from tqdm import tqdm

from data_pipeline.atomic_files import check_writable

USER_ERRORS = (ValueError, OSError)   # ours: readers, configs, loaders, checks (ValueError subclasses included)
EXIT_REFUSED = 2                       # click's own status for usage errors; ours for every refusal


def one_line(exc: BaseException | str, limit: int = 600) -> str:
    """The message on one line, at most `limit` characters: a message may echo input (a row, a
    prompt) of any length, so the middle is cut, keeping the file/key it starts with and the
    problem it ends with."""
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
    else:
        text = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head = (limit - 5) * 2 // 3
    return f"{text[:head]} ... {text[len(text) - (limit - 5 - head):]}"


def run(command: click.Command, args: list[str] | None = None) -> None:
    """Run a click command as a tool: its errors as one line each, exit status 2; never returns."""
    try:
        status = command.main(args=args, standalone_mode=False)
    except click.exceptions.Exit as exc:        # --help, ctx.exit(n)
        status = exc.exit_code
    except click.Abort:                          # Ctrl-C
        click.echo("error: interrupted", err=True)
        status = 1
    except click.ClickException as exc:          # bad options: click's message, without its usage block
        click.echo(f"error: {one_line(exc.format_message())}", err=True)
        status = exc.exit_code
    except USER_ERRORS as exc:
        if os.environ.get("MEMDIFF_TRACEBACK") == "1":
            raise
        for bar in list(getattr(tqdm, "_instances", ())):   # the failed work's progress bars end their line first
            bar.close()
        click.echo(f"error: {one_line(exc)}", err=True)
        status = EXIT_REFUSED
    sys.exit(status if isinstance(status, int) else 0)


class Finite(click.FloatRange):
    """A finite float (no NaN, no inf) in an optional range: the one numeric option type of every tool.

    click's FloatRange lets NaN through (every comparison with NaN is false) and inf through an
    open-ended range."""
    name = "finite number"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx) if not isinstance(value, float) else value
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


class FiniteList(click.ParamType):
    """Comma-separated finite numbers, each checked as Finite(...) ("7.5,5,3" -> [7.5, 5.0, 3.0])."""
    name = "numbers"

    def __init__(self, **limits) -> None:
        self.item = Finite(**limits)

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            self.fail("expected numbers separated by commas", param, ctx)
        return [self.item.convert(v, param, ctx) for v in items]


class Device(click.ParamType):
    """cpu, cuda or cuda:N, and only a GPU that this machine has."""
    name = "device"

    def convert(self, value, param, ctx):
        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            self.fail(f"{str(value)[:40]!r}: expected cpu, cuda or cuda:N", param, ctx)
        if device.type not in ("cpu", "cuda"):
            self.fail(f"{value!r}: expected cpu, cuda or cuda:N", param, ctx)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                self.fail(f"{value!r}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                          f"use --device cpu", param, ctx)
            if device.index is not None and device.index >= torch.cuda.device_count():
                self.fail(f"{value!r}: this machine has {torch.cuda.device_count()} GPU(s)", param, ctx)
        return value


DEVICE = Device()
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class OutputFolder(click.Path):
    """A folder the tool will write into: it (or, if it does not exist yet, its nearest existing
    parent) must be a writable folder, checked while parsing, before any long work."""

    def __init__(self) -> None:
        super().__init__(file_okay=False, dir_okay=True)

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        try:
            check_writable(path)
        except OSError as exc:
            self.fail(one_line(exc), param, ctx)
        return path


class OutputFile(click.Path):
    """A file the tool will write: not a folder, and its folder writable (as OutputFolder)."""

    def __init__(self) -> None:
        super().__init__(file_okay=True, dir_okay=False)

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        try:
            check_writable(os.path.dirname(os.path.abspath(path)))
        except OSError as exc:
            self.fail(one_line(exc), param, ctx)
        return path

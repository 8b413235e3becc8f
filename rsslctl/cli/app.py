"""The ``rsslctl`` command line: one click group wiring the built-in verbs (``rsslctl.cli``) and the verbs
plugins add through the ``rsslctl_commands`` hook. Bad input: one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import io
import os
import sys
from typing import Any

import click

from rsslctl import __version__
from rsslctl.cli.cite import cite
from rsslctl.cli.compare import compare_command
from rsslctl.cli.evaluate import evaluate
from rsslctl.cli.export import export
from rsslctl.cli.finetune import finetune_command
from rsslctl.cli.info import plugins, recipe
from rsslctl.cli.pretrain import pretrain
from rsslctl.cli.select_coreset import select_coreset
from rsslctl.base.registry import registry
from rsslctl.cli.common import fail


class OneLineGroup(click.Group):
    """click's own usage errors (unknown flag or verb, bad value, missing argument) end like every other error: one
    line naming the command and its ``--help``, exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if _stdout_closed():  # `rsslctl … >&-`: what it prints would be lost
            fail("standard output is closed; redirect it instead (e.g. `> out.txt` or `> /dev/null`)")
        return super().main(*args, **kwargs)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            _usage_error(exc)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # raised while parsing a verb's own arguments
            _usage_error(exc)


def _stdout_closed() -> bool:
    if sys.stdout is None:  # Python's own answer when descriptor 1 was closed at start
        return True
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):  # captured output (tests) has no descriptor
        return False
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def _usage_error(exc: click.UsageError) -> None:
    where = exc.ctx.command_path if exc.ctx else "rsslctl"
    fail(f"{where}: {exc.format_message()} (see `{where} --help`)")


@click.group(name="rsslctl", cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rsslctl")
def main() -> None:
    """Robust self-supervised learning: pretrain, fine-tune and evaluate robust encoders."""


for _command in (pretrain, evaluate, finetune_command, export, plugins, recipe, select_coreset, cite, compare_command):
    main.add_command(_command)
for _command, _info in registry().command_entries():
    if _command.name in main.commands:  # a plugin cannot replace a built-in (or an earlier plugin's) verb
        _info.error = f"verb '{_command.name}' is taken; not added"
    else:
        main.add_command(_command)


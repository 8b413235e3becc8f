"""The ``rsslctl`` command line: one click group wiring the built-in verbs (``rsslctl.cli``) and the verbs
plugins add through the ``rsslctl_commands`` hook. Bad input: one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import click

from rsslctl import __version__
from rsslctl.cli.cite import cite
from rsslctl.cli.evaluate import evaluate
from rsslctl.cli.export import export
from rsslctl.cli.finetune import finetune_command
from rsslctl.cli.info import plugins, recipe
from rsslctl.cli.pretrain import pretrain
from rsslctl.cli.select_coreset import select_coreset
from rsslctl.base.registry import registry


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rsslctl")
def main() -> None:
    """Robust self-supervised learning: pretrain, fine-tune and evaluate robust encoders."""


for _command in (pretrain, evaluate, finetune_command, export, plugins, recipe, select_coreset, cite):
    main.add_command(_command)
for _command, _info in registry().command_entries():
    if _command.name in main.commands:  # a plugin cannot replace a built-in (or an earlier plugin's) verb
        _info.error = f"verb '{_command.name}' is taken; not added"
    else:
        main.add_command(_command)


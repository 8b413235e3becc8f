"""The ``rsslctl`` command line: one click group wiring the built-in verbs (``VERBS``: one module each, imported only
when that verb runs or shows its ``--help``) and the verbs plugins add (declared ones are imported just as lazily).
Bad input: one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import importlib
import io
import os
import sys
from typing import Any

import click

from rsslctl import __version__
from rsslctl.base.errors import UserError
from rsslctl.base.registry import registry
from rsslctl.cli.common import fail

#: Built-in verbs: name → ("module:command", short help). Adding a verb = one line here (its module is imported only
#: when the verb is used, so `rsslctl --help` stays as cheap as click itself); tests/cli check each short help is the
#: command's own.
VERBS: dict[str, tuple[str, str]] = {
    "pretrain": ("rsslctl.cli.pretrain:pretrain", "Pretrain an encoder with RECIPE_FILE (TOML)."),
    "evaluate": ("rsslctl.cli.evaluate:evaluate",
                 "Without --mode: linear probe + PGD-20 (RUN_DIR/eval/<settings key>/results.json)."),
    "finetune": ("rsslctl.cli.finetune:finetune_command",
                 "Fine-tune a pretrained encoder (SLF / ALF / AFF, see docs/methods.md) and evaluate it."),
    "export": ("rsslctl.cli.export:export", "Write the encoder alone as safetensors, loadable into "
               "timm.create_model(name, num_classes=0); or, with --classifier, a fine-tuned classifier with a "
               "ready-to-use load_model(path) module."),
    "plugins": ("rsslctl.cli.info:plugins",
                "List installed plugins: kind, name, package, version, description (broken ones with their error)."),
    "recipe": ("rsslctl.cli.info:recipe", "Inspect recipes."),
    "select-coreset": ("rsslctl.cli.select_coreset:select_coreset", "Select a training coreset (the recipe's "
                       "[coreset] selector, else the default one) and write its indices."),
    "cite": ("rsslctl.cli.cite:cite",
             "Print the BibTeX of the methods, attacks, backbone and datasets RUN_DIR used (and of rsslctl)."),
    "compare": ("rsslctl.cli.compare:compare_command", "Compare the evaluations of run directories and sweep "
                "directories (RUN_OR_SWEEP…): runs whose recipes differ only in run.seed form a group; per group and "
                "evaluation setting, mean ± std and a 95 % Student-t interval."),
    "sweep": ("rsslctl.cli.sweep:sweep", "Pretrain every run of a sweep (SWEEP file, or a RECIPE with --seeds/--grid) "
              "and run its steps after pretraining."),
}


def load_verb(target: str) -> click.Command:
    """The click command ``module:attribute`` names (importing its module)."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


class OneLineGroup(click.Group):
    """click's own usage errors (unknown flag or verb, bad value, missing argument) end like every other error: one
    line naming the command and its ``--help``, exit code 2. Verbs are loaded lazily: ``lazy`` maps a verb to
    (loader, short help), and only ``get_command`` of that verb calls its loader."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, tuple[Any, str]] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy:
            try:
                self.add_command(self.lazy[name][0](), name)
            except UserError as exc:  # a declared plugin verb whose module fails to load
                fail(str(exc))
        return self.commands.get(name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The verbs and their short help, from ``lazy`` for verbs not loaded (so listing them imports nothing)."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            command = self.commands.get(name)
            if command is not None and command.hidden:
                continue
            shown = command if command is not None else click.Command(name, help=self.lazy[name][1])
            text = shown.get_short_help_str(limit)
            rows.append((name, text))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

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


def _add_verbs(group: OneLineGroup) -> None:
    for name, (target, short) in VERBS.items():
        group.lazy[name] = (lambda target=target: load_verb(target), short)
    reg = registry()
    for info in reg.command_infos():  # a plugin cannot replace a built-in (or an earlier plugin's) verb
        if info.name in group.lazy:
            info.error = f"verb '{info.name}' is taken; not added"
        else:
            group.lazy[info.name] = (lambda info=info: reg.command(info), info.doc)


_add_verbs(main)

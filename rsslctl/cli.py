"""The ``rsslctl`` command line. Bad input: one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import click
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import UserError
from .ui import console, err_console, summary_table


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted; continue with `rsslctl pretrain --resume RUN_DIR`")
            sys.exit(130)
    return wrapper


SET = click.option("--set", "overrides", multiple=True, metavar="KEY.SUB=VALUE",
                   help="Override a recipe value, e.g. --set schedule.epochs=5 (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rsslctl")
def main() -> None:
    """Robust self-supervised learning: pretrain, fine-tune and evaluate robust encoders."""


@main.command()
@click.argument("recipe_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@SET
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default <output_dir>/<name>).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Continue the run in this directory from its last checkpoint.")
@click.option("--force", is_flag=True, help="Replace an existing run directory.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@user_errors
def pretrain(recipe_file: Path | None, overrides: tuple[str, ...], run_dir: Path | None, resume_dir: Path | None,
             force: bool, quiet: bool) -> None:
    """Pretrain an encoder with RECIPE_FILE (TOML)."""
    from .engine import Trainer
    from .recipe import load
    from .runs import load_run_recipe, prepare_run_dir
    if resume_dir:
        if recipe_file or overrides or force:
            raise UserError("--resume continues a run with its saved recipe; do not pass a recipe, --set or --force with it")
        recipe = load_run_recipe(resume_dir)
        Trainer(recipe, resume_dir, quiet=quiet).fit(resume=True)
        return
    if recipe_file is None:
        raise UserError("missing RECIPE_FILE; e.g. `rsslctl pretrain recipes/quickstart.toml` (or --resume RUN_DIR)")
    recipe = load(recipe_file, list(overrides))
    trainer_dir = Path(run_dir) if run_dir else Path(recipe.run.output_dir) / recipe.run.name
    if trainer_dir.exists() and any(trainer_dir.iterdir()) and not force:
        prepare_run_dir(recipe, trainer_dir, force)  # raises the clear 'exists' error before any work
    trainer = Trainer(recipe, trainer_dir, quiet=quiet)  # loads data and builds the model: fails before touching disk
    prepare_run_dir(recipe, trainer_dir, force)
    trainer.fit()


def _eps(text: str) -> float:
    from .options import parse_number
    return parse_number(text.strip(), "--eps")


def suite_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Flags of the evaluation suite (shared by `evaluate --mode` and `finetune`)."""
    opts = [
        click.option("--eps", default="8/255", show_default=True, help="Attack radius (L∞: e.g. 8/255; L2: e.g. 0.5)."),
        click.option("--step-size", default="2/255", show_default=True, help="PGD step size."),
        click.option("--pgd-steps", default=20, show_default=True, type=click.IntRange(1), help="PGD iterations."),
        click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True, help="Threat model."),
        click.option("--fgsm/--no-fgsm", default=True, show_default=True, help="Also report FGSM accuracy."),
        click.option("--autoattack", is_flag=True, help="Run AutoAttack (pyautoattack); resumable through its state file."),
        click.option("--aa-version", type=click.Choice(["standard", "plus", "rand", "custom"]), default="standard",
                     show_default=True, help="AutoAttack version (custom needs --aa-attacks)."),
        click.option("--aa-attacks", default="", help="Custom AutoAttack list, e.g. apgd-ce,apgd-t,fab-t,square."),
        click.option("--aa-limit", default=0, type=click.IntRange(0), help="AutoAttack on a seeded random subset of N test images (0 = all)."),
        click.option("--aa-batch", default=128, show_default=True, type=click.IntRange(1), help="AutoAttack batch size."),
        click.option("--corruptions", is_flag=True, help="Common corruptions: CIFAR-10-C/100-C files if present, else generated."),
        click.option("--corruption-dir", default="", help="Folder with the CIFAR-C .npy files (default: data root)."),
        click.option("--corruption-limit", default=0, type=click.IntRange(0), help="First N images per severity (0 = all)."),
        click.option("--eps-curve", default="0,1,2,4,8,16", show_default=True,
                     help="ε values for the accuracy-vs-ε plot (L∞ in 1/255 units; '' = none)."),
        click.option("--test-limit", default=0, type=click.IntRange(0), help="Evaluate on the first N test images (0 = all)."),
        click.option("--eval-seed", default=0, type=click.IntRange(0), show_default=True, help="Seed of attacks and subsets."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _suite(kw: dict[str, Any]) -> Any:
    from .evaluate import SuiteOptions
    scale = 255 if kw["norm"] == "linf" else 1
    try:
        curve = tuple(float(v) / scale for v in kw["eps_curve"].split(",") if v.strip())
    except ValueError:
        raise UserError(f"--eps-curve: expected numbers separated by commas, got {kw['eps_curve']!r}") from None
    attacks = tuple(a.strip() for a in kw["aa_attacks"].split(",") if a.strip())
    bad = [a for a in attacks if a not in ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")]
    if bad:
        raise UserError(f"--aa-attacks: unknown attack {bad[0]!r}; choose from apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square")
    if attacks and kw["aa_version"] != "custom":
        raise UserError("--aa-attacks needs --aa-version custom")
    return SuiteOptions(eps=_eps(kw["eps"]), step_size=_eps(kw["step_size"]), pgd_steps=kw["pgd_steps"], norm=kw["norm"],
                        fgsm=kw["fgsm"], autoattack=kw["autoattack"], aa_version=kw["aa_version"], aa_attacks=attacks,
                        aa_limit=kw["aa_limit"], aa_batch=kw["aa_batch"], corruptions=kw["corruptions"],
                        corruption_dir=kw["corruption_dir"], corruption_limit=kw["corruption_limit"], eps_curve=curve,
                        test_limit=kw["test_limit"], seed=kw["eval_seed"])


SUITE_KEYS = ("eps", "step_size", "pgd_steps", "norm", "fgsm", "autoattack", "aa_version", "aa_attacks", "aa_limit",
              "aa_batch", "corruptions", "corruption_dir", "corruption_limit", "eps_curve", "test_limit", "eval_seed")


def _show_report(report: dict[str, Any], out_dir: Path, as_json: bool) -> None:
    import json

    from .evaluate import report_table
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    console.print(report_table(report))
    console.print(f"saved to {Path(out_dir) / 'evaluation' / 'report.json'}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@SET
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--mode", type=click.Choice(["SLF", "ALF", "AFF", "ALL"]), default=None,
              help="Evaluate the fine-tuned model(s) of RUN_DIR/finetune/<MODE> with the full suite.")
@click.option("--force", is_flag=True, help="Replace existing evaluation results.")
@suite_options
@user_errors
def evaluate(run_dir: Path, overrides: tuple[str, ...], as_json: bool, mode: str | None, force: bool, **kw: Any) -> None:
    """Without --mode: linear probe + PGD-20 (RUN_DIR/eval.json). With --mode: the robustness suite of §6.4."""
    import json

    from .evaluate import evaluate_finetuned, evaluate_run
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    if mode:
        modes = ["SLF", "ALF", "AFF"] if mode == "ALL" else [mode]
        _show_report(evaluate_finetuned(run_dir, modes, _suite(kw), list(overrides), force), run_dir, as_json)
        return
    result = evaluate_run(run_dir, list(overrides))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    a = result["attack"]
    console.print(summary_table(f"evaluation of {run_dir} (epoch {result['epoch']})", {
        "protocol": result["protocol"], "BN route": result["route"], "test images": result["test_images"],
        "clean accuracy": f"{100 * result['clean_accuracy']:.2f} %",
        f"robust accuracy ({a['name'].upper()}-{a['steps']}, ε {a['eps'] * 255:.3g}/255)": f"{100 * result['robust_accuracy']:.2f} %",
        "saved to": str(Path(run_dir) / "eval.json")}))


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--mode", type=click.Choice(["SLF", "ALF", "AFF", "ALL"]), default="ALL", show_default=True,
              help="Fine-tuning mode; ALL runs SLF, ALF and AFF from one immutable configuration.")
@click.option("--timm", "timm_model", help="External encoder: timm model name (with --weights).")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), help="External encoder weights (.safetensors).")
@click.option("--cifar-stem/--no-cifar-stem", default=None, help="External ResNet: 3×3 stem without max-pool (default: from the file's metadata, else off).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="Output directory (default RUN_DIR; required with --weights).")
@click.option("--data", help="Downstream dataset (transfer), e.g. cifar100 or stl10 (default: the run's dataset).")
@click.option("--data-root", help="Data root of the downstream dataset.")
@click.option("--image-size", type=click.IntRange(8), help="Downstream image size (e.g. 32 for STL-10 cross-task, 96 self-task).")
@click.option("--pretraining", default="auto", show_default=True,
              help="Row of the §6.3 hyper-parameter table: ACL, DynACL, DynACL++, ACL-AIR, DynACL-AIR, DynACL-AIR++, "
                   "AdvCL, A-InfoNCE, DeACL or other (auto: from the run's method).")
@click.option("--epochs", type=click.IntRange(1), help="Epochs (default: §6.3 table, else 25).")
@click.option("--batch-size", type=click.IntRange(1), help="Batch size (default: §6.3 table).")
@click.option("--lr", type=float, help="Learning rate (default: §6.3 table).")
@click.option("--milestones", help="LR ×0.1 after these epochs, e.g. 15,20 (default: §6.3 table).")
@click.option("--weight-decay", type=float, help="SGD weight decay (default 2e-4).")
@click.option("--beta", type=float, help="TRADES β for AFF (default 6).")
@click.option("--train-eps", help="Training attack radius (default 8/255).")
@click.option("--train-step-size", help="Training attack step (default 2/255).")
@click.option("--train-steps", type=click.IntRange(1), help="Training attack iterations (default 10).")
@click.option("--label-fraction", type=float, help="Class-balanced seeded fraction of training labels, e.g. 0.01, 0.1.")
@click.option("--single-bn", is_flag=True, help="AFF on a dual-BN checkpoint: single-BN TRADES (reference --dualBN 0).")
@click.option("--seed", type=click.IntRange(0), help="Seed of the label subset, augmentation and attacks (default 0).")
@click.option("--evaluate/--no-evaluate", "then_evaluate", default=True, show_default=True, help="Run the evaluation suite afterwards.")
@SET
@click.option("--force", is_flag=True, help="Replace existing fine-tuning (and evaluation) outputs.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@suite_options
@user_errors
def finetune(run_dir: Path | None, mode: str, timm_model: str | None, weights: Path | None, cifar_stem: bool | None,
             out_dir: Path | None, data: str | None, data_root: str | None, image_size: int | None, pretraining: str,
             overrides: tuple[str, ...], force: bool, quiet: bool, as_json: bool, then_evaluate: bool, **kw: Any) -> None:
    """Fine-tune a pretrained encoder (SLF / ALF / AFF, METHODS.md §6) and evaluate it."""
    from . import finetune as ft
    from .evaluate import evaluate_finetuned
    if (run_dir is None) == (weights is None):
        raise UserError("pass either RUN_DIR (a pretraining run) or --weights FILE.safetensors [--timm MODEL]")
    if run_dir is not None:
        if not Path(run_dir).is_dir():
            raise UserError(f"{run_dir}: run directory not found")
        source = ft.from_run(run_dir)
    else:
        if out_dir is None:
            raise UserError("--weights needs --out DIR for the results")
        source = ft.from_safetensors(weights, timm_model, cifar_stem)
    out_dir = Path(out_dir or run_dir)
    recipe = ft.downstream_recipe(source.recipe_raw, data, data_root, image_size, list(overrides))
    train_keys = ("epochs", "batch_size", "lr", "weight_decay", "beta", "train_steps", "label_fraction", "seed")
    user: dict[str, Any] = {k: kw.pop(k) for k in train_keys}
    user["eps"] = _eps(kw.pop("train_eps")) if kw.get("train_eps") else kw.pop("train_eps")
    user["step_size"] = _eps(kw.pop("train_step_size")) if kw.get("train_step_size") else kw.pop("train_step_size")
    ms = kw.pop("milestones")
    try:
        user["milestones"] = tuple(int(m) for m in ms.split(",") if m.strip()) if ms is not None else None
    except ValueError:
        raise UserError(f"--milestones: expected epochs separated by commas, e.g. 15,20; got {ms!r}") from None
    user["dual_bn"] = False if kw.pop("single_bn") else None
    row = source.pretraining if pretraining == "auto" else pretraining
    configs = ft.resolve_configs(mode, row, recipe.resolved["data"]["name"], recipe.data.image_size, user)
    suite = _suite(kw)  # validate evaluation flags before training
    ft.finetune(source, recipe, configs, out_dir, force, quiet)
    if then_evaluate:
        report = evaluate_finetuned(out_dir, [c.mode for c in configs], suite, list(overrides), force)
        _show_report(report, out_dir, as_json)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Output file (default RUN_DIR/encoder.safetensors).")
@click.option("--route", type=click.Choice(["auto", "normal", "pgd"]), default="auto", show_default=True,
              help="BN route of a dual-BN encoder to export.")
@user_errors
def export(run_dir: Path, out: Path | None, route: str) -> None:
    """Write the encoder alone as safetensors, loadable into timm.create_model(name, num_classes=0)."""
    from .runs import export_encoder
    path, info = export_encoder(run_dir, out, route)
    console.print(f"wrote {path} (BN route {info['bn_route']}); rebuild with {info['backbone']}")


@main.command()
@click.option("--options", "show_options", is_flag=True, help="Also list every plugin's options and defaults.")
@user_errors
def plugins(show_options: bool) -> None:
    """List installed plugins: kind, name, package, version, description (broken ones with their error)."""
    from .options import describe
    from .registry import registry
    table = Table(title="rsslctl plugins")
    for col in ("kind", "name", "package", "version", "description"):
        table.add_column(col)
    for info in registry().all():
        desc = f"[red]failed to load: {escape(info.error)}[/]" if info.error else escape(info.doc)
        table.add_row(info.kind, info.name, info.package, info.version, desc)
        if show_options and info.cls is not None:
            for name, tname, default, help_ in describe(info.cls.Options):
                table.add_row("", f"  .{name}", "", "", f"{tname} = {default!r}  {help_}")
    console.print(table)


@main.command("dynacl-pp")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New run directory for the post-processed encoder (evaluate it with `rsslctl evaluate`).")
@click.option("--clusters", default=10, show_default=True, help="k-means clusters for the pseudo labels.")
@click.option("--probe-epochs", default=10, show_default=True, help="Linear probing epochs on pseudo labels.")
@click.option("--epochs", default=25, show_default=True, help="Pseudo-label TRADES epochs.")
@click.option("--batch-size", default=512, show_default=True, help="Batch size of both stages.")
@click.option("--steps", default=10, show_default=True, help="PGD steps of the TRADES attack.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
@user_errors
def dynacl_pp(run_dir: Path, out_dir: Path, clusters: int, probe_epochs: int, epochs: int, batch_size: int,
              steps: int, force: bool) -> None:
    """DynACL++ post-processing of RUN_DIR: k-means pseudo labels, linear probing, pseudo-label TRADES."""
    from .postprocess import PostprocessOptions, dynacl_pp as run
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    for name, value in (("--clusters", clusters), ("--probe-epochs", probe_epochs), ("--epochs", epochs),
                        ("--batch-size", batch_size), ("--steps", steps)):
        if value < 1 or (name == "--clusters" and value < 2):
            raise UserError(f"{name} = {value}: must be at least {2 if name == '--clusters' else 1}")
    info = run(run_dir, out_dir, PostprocessOptions(clusters=clusters, probe_epochs=probe_epochs, epochs=epochs,
                                                    batch_size=batch_size, steps=steps), force)
    console.print(f"wrote {out_dir} (pseudo-label cluster sizes {info['cluster_sizes']}); "
                  f"evaluate with `rsslctl evaluate {out_dir}`")
@main.command("select-coreset")
@click.argument("recipe_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Select with this run's current encoder (its newest checkpoint) and saved recipe.")
@click.option("--fraction", type=float, required=True, help="Coreset size as a fraction of the training pool, in (0, 1].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output file: .safetensors (indices tensor, metadata in the header) or .json.")
@SET
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@user_errors
def select_coreset(recipe_file: Path | None, run_dir: Path | None, fraction: float, out: Path,
                   overrides: tuple[str, ...], force: bool) -> None:
    """Select a training coreset (RCS unless [coreset] name says otherwise) and write its indices.

    Train on it with `--set coreset.indices_file=OUT` in `rsslctl pretrain`.
    """
    from .coreset import select_standalone
    meta = select_standalone(recipe_file, run_dir, fraction, out, list(overrides), force)
    console.print(summary_table(f"coreset written to {out}", {
        "selector": meta["selector"], "images": f"{meta['size']} of {meta['pool_size']} "
        f"(fraction {meta['fraction']:g}, {meta['validation_size']} held out for validation)",
        "encoder": f"{meta['source']} (epoch {meta['epoch']}), sha256 {meta['encoder_sha256'][:16]}…",
        "selection time": f"{meta['seconds']:.1f} s", "use it": f"--set coreset.indices_file={str(out)!r}"}))


@main.group()
def recipe() -> None:
    """Inspect recipes."""


@recipe.command("show")
@click.argument("recipe_file", type=click.Path(dir_okay=False, path_type=Path))
@SET
@user_errors
def recipe_show(recipe_file: Path, overrides: tuple[str, ...]) -> None:
    """Print the fully resolved recipe (all defaults filled in) after validation."""
    from .recipe import dumps_toml, load
    click.echo(dumps_toml(load(recipe_file, list(overrides)).resolved), nl=False)


def _add_plugin_commands() -> None:
    """Verbs contributed by plugins through the ``rsslctl_commands`` hook; a broken one is listed by `plugins`."""
    from .registry import registry
    for command in registry().commands():
        if command.name not in main.commands:
            main.add_command(command)


_add_plugin_commands()

if __name__ == "__main__":
    main()

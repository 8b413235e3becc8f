"""`rsslctl evaluate`: a linear probe + PGD of a pretraining run, or the robustness suite of its fine-tuned models."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import click

from rsslctl.base.console import console, summary_table
from rsslctl.base.errors import UserError
from rsslctl.cli.common import SET, show_report, suite_from_flags, suite_options, user_errors
from rsslctl.eval.options import SuiteOptions
from rsslctl.run.directory import RECIPE_FILE, load_run_recipe

EMBEDDING_FILE = "embedding.png"


def evaluate_run(run_dir: Path, overrides: list[str] = (), force: bool = True, knn: bool = False,
                 plot_embedding: bool = False) -> dict[str, Any]:
    """Linear probe + clean/robust accuracy of the newest checkpoint of ``run_dir`` (and, if asked, weighted kNN
    accuracy and a t-SNE plot of the test features); writes eval/<settings key>/results.json (``rsslctl.eval.store``;
    the result's ``saved_to`` says where). ``force`` replaces only an evaluation with the same settings."""
    import torch  # here, not at the top: `rsslctl evaluate --help` imports no torch

    from rsslctl.eval import store
    from rsslctl.run.build import load_split, load_trained_method, setup_device
    from rsslctl.runtime import distributed
    from rsslctl.train.classify import Classifier, accuracy, extract_features, train_linear_probe
    from rsslctl.train.monitor import embedding_plot, knn_accuracy
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir, overrides)
    distributed.refuse_many("evaluate")
    device = setup_device(recipe)
    torch.manual_seed(recipe.run.seed)
    method, ckpt, meta = load_trained_method(run_dir, recipe, device, "evaluate")
    encoder = method.eval_encoder()
    ev = recipe.evaluation
    route = ("pgd" if encoder.dual_bn else "normal") if ev.route == "auto" else ev.route
    train, test = load_split(recipe, recipe.data.train_split), load_split(recipe, recipe.data.test_split)
    if (train.labels < 0).all():
        raise UserError(f"data.train_split = '{recipe.data.train_split}' has no labels; set data.train_split to a "
                        "labelled split")
    if ev.limit:
        test = test.subset(torch.arange(min(ev.limit, len(test))))
    trained_data = tomllib.loads((run_dir / RECIPE_FILE).read_text()).get("data", {})
    data = {k: v for k, v in recipe.resolved["data"].items() if trained_data.get(k) != v}  # changed by --set
    settings = store.probe_settings(recipe.resolved["evaluation"], route, len(test), data, knn)
    store.check_free(run_dir, settings, force)  # before the probe is trained: a refusal costs nothing
    out_dir = store.result_dir(run_dir, settings)
    method.requires_grad_(False)
    feats = extract_features(method, lambda x: method.eval_features(x, route), train.images, device,
                             recipe.engine.precision)
    model = Classifier(method, method.eval_features, feats.shape[1], len(train.classes), route).to(device)
    model.head = train_linear_probe(feats, train.labels.to(device), len(train.classes), ev.epochs, ev.lr,
                                    ev.batch_size, ev.weight_decay, recipe.run.seed)
    suite = SuiteOptions(attack=ev.attack, clamp_start=ev.clamp_start)
    attack = suite.make(ev.attack, eps=ev.eps, step_size=ev.step_size, steps=ev.steps)
    torch.manual_seed(recipe.run.seed)
    clean = accuracy(model, test.images, test.labels, device)
    robust = accuracy(model, test.images, test.labels, device, attack)
    result = {"checkpoint": str(ckpt), "epoch": meta["epoch"],
              "protocol": "linear probe on frozen features (SLF-style)",
              "route": route, "test_images": len(test), "clean_accuracy": clean, "robust_accuracy": robust,
              "attack": {"name": ev.attack, "eps": ev.eps, "step_size": ev.step_size, "steps": ev.steps,
                         "clamp_start": ev.clamp_start},
              "probe": {"epochs": ev.epochs, "lr": ev.lr, "batch_size": ev.batch_size, "weight_decay": ev.weight_decay},
              "settings_key": store.settings_key(settings)}
    if knn or plot_embedding:
        test_feats = extract_features(method, lambda x: method.eval_features(x, route), test.images, device,
                                      recipe.engine.precision)
        if knn:
            result["knn"] = {"accuracy": knn_accuracy(feats, train.labels.to(device), test_feats,
                                                      test.labels.to(device),
                                                      ev.knn_k, ev.knn_temperature),
                             "k": ev.knn_k, "temperature": ev.knn_temperature, "test_images": len(test)}
        if plot_embedding:
            out_dir.mkdir(parents=True, exist_ok=True)
            embedding_plot(test_feats, test.labels, train.classes, out_dir / EMBEDDING_FILE,
                           f"{recipe.method.name}, epoch {meta['epoch']}", recipe.run.seed)
            result["embedding_plot"] = str(out_dir / EMBEDDING_FILE)
    result["saved_to"] = str(store.save(run_dir, settings, result))
    return result


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@SET
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--mode", type=click.Choice(["SLF", "ALF", "AFF", "ALL"]), default=None,
              help="Evaluate the fine-tuned model(s) of RUN_DIR/finetune/<MODE> with the full suite.")
@click.option("--force", is_flag=True, help="Replace the existing evaluation with the same settings (others are kept).")
@click.option("--knn", is_flag=True,
              help="Also weighted kNN accuracy on frozen features (evaluation.knn_k, knn_temperature).")
@click.option("--plot-embedding", is_flag=True, help="Also a t-SNE plot of the test features (RUN_DIR/embedding.png).")
@suite_options
@user_errors
def evaluate(run_dir: Path, overrides: tuple[str, ...], as_json: bool, mode: str | None, force: bool, knn: bool,
             plot_embedding: bool, **kw: Any) -> None:
    """Without --mode: linear probe + PGD-20 (RUN_DIR/eval/<settings key>/results.json). With --mode: the robustness
    suite of the RobustSSL benchmark on fine-tuned models (see docs/methods.md)."""
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    if mode:
        from rsslctl.eval.suite import evaluate_finetuned
        modes = ["SLF", "ALF", "AFF"] if mode == "ALL" else [mode]
        show_report(evaluate_finetuned(run_dir, modes, suite_from_flags(kw), list(overrides), force), run_dir, as_json)
        return
    result = evaluate_run(run_dir, list(overrides), force=force, knn=knn, plot_embedding=plot_embedding)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    a = result["attack"]
    console.print(summary_table(f"evaluation of {run_dir} (epoch {result['epoch']})", {
        "protocol": result["protocol"], "BN route": result["route"], "test images": result["test_images"],
        "clean accuracy": f"{100 * result['clean_accuracy']:.2f} %",
        f"robust accuracy ({a['name'].upper()}-{a['steps']}, ε {a['eps'] * 255:.3g}/255)":
            f"{100 * result['robust_accuracy']:.2f} %",
        **({f"kNN accuracy (k {result['knn']['k']}, τ {result['knn']['temperature']:g})":
            f"{100 * result['knn']['accuracy']:.2f} %"} if "knn" in result else {}),
        **({"embedding plot": result["embedding_plot"]} if "embedding_plot" in result else {}),
        "saved to": result["saved_to"]}))

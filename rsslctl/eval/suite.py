"""The robustness suite of a classifier on pixels in [0, 1]: clean, FGSM, PGD-k, AutoAttack, common corruptions and
the accuracy-vs-ε curve, with the RobustSSL leaderboard fields and the report written from per-mode results."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from rsslctl.base.console import err_console as console  # status lines go to stderr, so `--json` stdout stays parseable
from rsslctl.base.errors import UserError
from rsslctl.base.files import atomic_save_figure, atomic_write_text
from rsslctl.eval.metrics import METRICS, Metric, declared, leaderboard, register_metric
from rsslctl.eval.options import AA_ATTACKS, SuiteOptions  # noqa: F401 (re-exported)
from rsslctl.eval.store import settings_key
from rsslctl.run.build import load_split, setup_device
from rsslctl.run.directory import refuse_existing
from rsslctl.run.recipe import resolve
from rsslctl.train.classify import accuracy, load_classifier, mode_dir


def autoattack_accuracy(model: nn.Module, images: Tensor, labels: Tensor, opts: SuiteOptions, device: torch.device,
                        state_path: Path) -> dict[str, Any]:
    """AutoAttack (pyautoattack, the authors' package) on the full test set or a seeded subset; resumable.

    The attacks of the chosen version run one after another on the images still classified correctly, as
    AutoAttack itself does; after each attack the per-image robust flags go to ``state_path`` (JSON), so a killed
    evaluation resumes after the last finished attack. (pyautoattack 0.2.0's own state file cannot be read back:
    it stores a Python set as a string.) Robust accuracy = images correct under every attack.
    """
    from pyautoattack import AutoAttack

    if opts.aa_limit and opts.aa_limit < len(labels):
        index = aa_subset(len(labels), opts.aa_limit, opts.seed)
        images, labels = images[index], labels[index]
    norm = {"linf": "Linf", "l2": "L2"}[opts.norm]
    kwargs: dict[str, Any] = {"eps": opts.eps, "norm": norm, "version": opts.aa_version, "device": device,
                              "seed": opts.seed}
    if opts.aa_version == "custom":
        if not opts.aa_attacks:
            raise UserError("--aa-version custom needs --aa-attacks, e.g. apgd-ce,apgd-t")
        kwargs["attacks"] = list(opts.aa_attacks)
    model.eval()
    adversary = AutoAttack(model, **kwargs)
    attacks = list(adversary.attacks_to_run)
    x = images.float().div(255)
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state is None or state.get("attacks") != attacks or len(state["robust"]) != len(labels):
        with torch.no_grad():
            correct = torch.cat([model(xb.to(device)).argmax(1).cpu() == yb for xb, yb in zip(x.split(opts.aa_batch),
                                                                                        labels.split(opts.aa_batch))])
        state = {"attacks": attacks, "done": [], "clean": correct.tolist(), "robust": correct.tolist(),
                 "max_delta": 0.0}
        atomic_write_text(state_path, json.dumps(state))
    robust = torch.tensor(state["robust"], dtype=torch.bool)
    for attack in attacks:
        if attack in state["done"]:
            continue
        idx = robust.nonzero().flatten()
        if len(idx):
            adversary.attacks_to_run = [attack]  # as pyautoattack's run_standard_evaluation_individual does
            x_adv, _ = adversary.run_standard_evaluation(x[idx], labels[idx], batch_size=opts.aa_batch)
            with torch.no_grad():
                still = torch.cat([model(xb.to(device)).argmax(1).cpu() == yb
                                   for xb, yb in zip(x_adv.split(opts.aa_batch), labels[idx].split(opts.aa_batch))])
            delta = (x_adv - x[idx]).flatten(1)  # AutoAttack returns the clean image where it failed
            size = delta.abs().max(1).values if norm == "Linf" else delta.norm(dim=1)
            state["max_delta"] = max(state["max_delta"], float(size.max()))
            robust[idx[~still]] = False
        state["done"].append(attack)
        state["robust"] = robust.tolist()
        atomic_write_text(state_path, json.dumps(state))
        console.print(f"  AutoAttack {attack}: {int(robust.sum())}/{len(robust)} still correct", highlight=False)
    n = len(labels)
    return {"robust_accuracy": float(robust.float().mean()), "clean_accuracy": sum(state["clean"]) / n, "images": n,
            "version": opts.aa_version, "attacks": attacks, "norm": norm, "eps": opts.eps,
            "max_perturbation": state["max_delta"], "state_file": str(state_path)}


def corruption_accuracy(model: nn.Module, test: Any, folder: str, root: Path, opts: SuiteOptions,
                        device: torch.device) -> dict[str, Any]:
    """Accuracy per corruption and severity; mean per severity over corruptions; mean over severities (CA)."""
    from rsslctl.data import corruptions as C

    folder = C.corruption_dir(Path(opts.corruption_dir or root), folder)
    acc: dict[str, dict[str, float]] = {}
    if folder is not None:
        source = f"files: {folder}"
        for name, s, images, labels in C.read_corruptions(folder, opts.corruption_limit):
            acc.setdefault(name, {})[str(s)] = accuracy(model, images, labels, device, batch=opts.batch_size)
    else:
        source = ("generated on the fly by rsslctl (8 of 15 corruptions, CIFAR-10-C parameters; "
                  "not comparable with CIFAR-10-C files)")
        limit = opts.corruption_limit or len(test)
        images, labels = test.images[:limit], test.labels[:limit]
        g = torch.Generator().manual_seed(opts.seed)
        for name in C.GENERATED:
            for s in C.SEVERITIES:
                bad = torch.cat([C.generate(chunk.float().div(255), name, s, g)
                                 for chunk in images.split(opts.batch_size)])
                acc.setdefault(name, {})[str(s)] = accuracy(model, bad, labels, device, batch=opts.batch_size)
    per_severity = {str(s): sum(v[str(s)] for v in acc.values()) / len(acc) for s in C.SEVERITIES}
    return {"source": source, "generated": folder is None, "corruptions": sorted(acc), "per_corruption": acc,
            "per_severity": per_severity, "mean": sum(per_severity.values()) / len(per_severity)}


def evaluate_model(model: nn.Module, test: Any, corruption_folder: str, data_root: Path, opts: SuiteOptions,
                   device: torch.device, state_path: Path) -> dict[str, Any]:
    """Clean, FGSM, PGD-k, AutoAttack, corruptions and the accuracy-vs-ε curve of a classifier on pixels in [0, 1].

    Every accuracy of one result is measured on the same test images: with an AutoAttack subset (``aa_limit``) the
    whole suite runs on that subset, so robust accuracy can never be compared with a clean accuracy of other images.
    (Corruption files hold their own copies of the test set; ``corruption_limit`` sets how many per severity.)"""
    model.eval()
    if opts.autoattack and opts.aa_limit and opts.aa_limit < len(test):
        test = test.subset(aa_subset(len(test), opts.aa_limit, opts.seed))
    x, y = test.images, test.labels
    out: dict[str, Any] = {"test_images": len(y), "settings": suite_settings(opts)}
    context = Measuring(model, test, x, y, opts, device, state_path, corruption_folder, Path(data_root), out)
    for metric in list(METRICS.values()):
        value = metric.measure(context)
        if value is not None:
            out[metric.key] = value
    out["leaderboard"] = leaderboard_fields(out)
    return out


@dataclasses.dataclass
class Measuring:
    """What a metric's ``measure`` gets: the model, the test images (all metrics measure the same ones), the
    options, where AutoAttack keeps its state, the dataset's corruption folder, and the result so far."""

    model: nn.Module
    test: Any
    x: Tensor
    y: Tensor
    opts: SuiteOptions
    device: torch.device
    state_path: Path
    corruption_folder: str
    data_root: Path
    result: dict[str, Any]

    def accuracy(self, attack: Any = None, images: Tensor | None = None, labels: Tensor | None = None) -> float:
        """Accuracy on the test images (or ``images``), under ``attack`` when given."""
        return accuracy(self.model, self.x if images is None else images, self.y if labels is None else labels,
                        self.device, attack, batch=self.opts.batch_size)


# -- the built-in metrics, in the order they run and are reported ----------------------------------------------------
def _clean(c: Measuring) -> float:
    acc = c.accuracy()
    console.print(f"  clean accuracy {100 * acc:.2f} % on {len(c.y)} images", highlight=False)
    return acc


def _fgsm(c: Measuring) -> dict[str, Any] | None:
    o = c.opts
    if not o.fgsm:
        return None
    torch.manual_seed(o.seed)
    return {"attack": o.single_step_attack, "eps": o.eps, "norm": o.norm,
            "accuracy": c.accuracy(o.make(o.single_step_attack, eps=o.eps))}


def _pgd(c: Measuring) -> dict[str, Any]:
    o = c.opts
    torch.manual_seed(o.seed)
    pgd = o.make(o.attack, eps=o.eps, step_size=o.step_size, steps=o.pgd_steps)
    out = {"eps": o.eps, "step_size": o.step_size, "steps": o.pgd_steps, "norm": o.norm, "attack": o.attack,
           "random_start": True, "clamp_start": o.clamp_start, "accuracy": c.accuracy(pgd)}
    console.print(f"  {o.attack}-{o.pgd_steps} accuracy {100 * out['accuracy']:.2f} %", highlight=False)
    return out


def _eps_curve(c: Measuring) -> list[dict[str, float]]:
    o, curve = c.opts, []
    for eps in o.eps_curve:
        torch.manual_seed(o.seed)
        attack = None if eps == 0 else o.make(o.attack, eps=eps, step_size=eps / 4, steps=o.pgd_steps)
        curve.append({"eps": eps, "accuracy": c.accuracy(attack)})
    return curve


def _pct(v: float) -> float:
    return round(100 * v, 2)


def _corruption_fields(r: dict[str, Any]) -> dict[str, Any]:
    corr = r["corruption"]
    return {"CA": _pct(corr["mean"]), **{f"CS-{s}": _pct(corr["per_severity"][s]) for s in ("1", "2", "3", "4", "5")},
            "CA_generated": corr["generated"]}


def _aa_notes(mode: str, r: dict[str, Any]) -> list[str]:
    aa = r["autoattack"]
    return [f"{mode}: AutoAttack {aa['version']} ({', '.join(aa['attacks'])}) on {aa['images']} images"]


def _corruption_notes(mode: str, r: dict[str, Any]) -> list[str]:
    if not r["corruption"].get("generated"):
        return []
    return [f"{mode}: CA from GENERATED corruptions ({len(r['corruption']['corruptions'])} of 15), not CIFAR-C files"]


def _corruption_column(s: str) -> tuple[str, Any]:
    return f"CS-{s}", lambda r: (r.get("corruption") or {}).get("per_severity", {}).get(s)


for _metric in (
    Metric("clean_accuracy", _clean, columns=(("SA", lambda r: r["clean_accuracy"]),),
           fields=lambda r: {"SA": _pct(r["clean_accuracy"])}),
    Metric("fgsm", _fgsm, columns=(("FGSM", lambda r: r.get("fgsm", {}).get("accuracy")),)),
    Metric("pgd", _pgd, columns=(("PGD", lambda r: r["pgd"]["accuracy"]),),
           fields=lambda r: {"PGD": _pct(r["pgd"]["accuracy"])}),
    Metric("autoattack", lambda c: autoattack_accuracy(c.model, c.x, c.y, c.opts, c.device, c.state_path)
           if c.opts.autoattack else None,
           columns=(("AA (RA)", lambda r: (r.get("autoattack") or {}).get("robust_accuracy")),),
           fields=lambda r: {"RA": _pct(r["autoattack"]["robust_accuracy"])}, notes=_aa_notes),
    Metric("corruption", lambda c: corruption_accuracy(c.model, c.test, c.corruption_folder, c.data_root, c.opts,
                                                       c.device) if c.opts.corruptions else None,
           columns=(("CA", lambda r: (r.get("corruption") or {}).get("mean")), *map(_corruption_column, "135")),
           fields=_corruption_fields, notes=_corruption_notes),
    Metric("eps_curve", _eps_curve),
):
    register_metric(_metric)


def aa_subset(n: int, limit: int, seed: int) -> Tensor:
    """The seeded, sorted subset of ``limit`` of ``n`` test images that AutoAttack (and so the whole suite) uses."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def suite_settings(opts: SuiteOptions) -> dict[str, Any]:
    """The settings that decide a result's numbers (stored with every mode's result)."""
    values = {**dataclasses.asdict(opts), **opts.extra}
    return {s.name: values[s.name] for s in declared(SuiteOptions) if s.decides and s.name in values}


def leaderboard_fields(result: dict[str, Any]) -> dict[str, Any]:
    """SA / RA / CA in percent as on the RobustSSL leaderboard (RA = AutoAttack only); what did not run is absent."""
    return leaderboard(result)


def write_report(out_dir: Path, key: str = "") -> dict[str, Any]:
    """Rebuild report.json and eps_curve.png from the per-mode result files of one evaluation setting
    (evaluation/<key>/; without ``key`` the single folder of runs written before settings were kept apart)."""
    eval_dir = Path(out_dir) / "evaluation" / key
    modes = {}
    for mode in ("SLF", "ALF", "AFF"):
        path = eval_dir / f"{mode}.json"
        if path.is_file():
            modes[mode] = json.loads(path.read_text())
    report = {"protocol": "RobustSSL benchmark (docs/methods.md, Evaluation): fine-tuned classifier, eval mode; SA = "
                          "clean, "
                          "RA = AutoAttack, CA = mean corruption accuracy over severities 1-5 (percent)",
              "leaderboard": {m: r["leaderboard"] for m, r in modes.items()}, "modes": modes}
    differ = sorted({k for r in modes.values() for k, v in r.get("settings", {}).items()
                     if any(o.get("settings", {}).get(k) != v for o in modes.values())})
    if differ:  # modes evaluated at different times with different flags: say so instead of merging silently
        report["settings_differ"] = differ
    report["folder"] = str(eval_dir)
    atomic_write_text(eval_dir / "report.json", json.dumps(report, indent=2))
    if any(r["eps_curve"] for r in modes.values()):
        plot_eps_curve(modes, eval_dir / "eps_curve.png")
    return report


def plot_eps_curve(modes: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode, r in modes.items():
        if r["eps_curve"]:
            scale = 255 if r["pgd"]["norm"] == "linf" else 1
            ax.plot([p["eps"] * scale for p in r["eps_curve"]], [100 * p["accuracy"] for p in r["eps_curve"]],
                    marker="o", label=mode)
    norm = next(iter(modes.values()))["pgd"]
    counts = sorted({r["test_images"] for r in modes.values() if r["eps_curve"]})
    ax.set_title(f"accuracy vs ε ({' / '.join(map(str, counts))} test images)")
    ax.set_xlabel("ε (×1/255, L∞)" if norm["norm"] == "linf" else "ε (L2)")
    ax.set_ylabel(f"accuracy under PGD-{norm['steps']} (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)  # a failed write (disk full) leaves no temporary file


def report_table(report: dict[str, Any]) -> Any:
    """The report as a rich table: one row per mode, accuracies in percent."""
    from rich.table import Table

    table = Table(title="robustness report (accuracy %)")
    cols = [col for m in METRICS.values() for col in m.columns]
    table.add_column("mode", style="bold")
    for name, _ in cols:
        table.add_column(name, justify="right")
    table.add_column("test images", justify="right")
    for mode, r in report["modes"].items():
        cells = [f"{100 * v:.2f}" if v is not None else "–" for v in (get(r) for _, get in cols)]
        table.add_row(mode, *cells, str(r["test_images"]))
    notes = [note for mode, r in report["modes"].items() for m in METRICS.values()
             if m.notes is not None and r.get(m.key) for note in m.notes(mode, r)]
    p = next(iter(report["modes"].values()))["pgd"]
    notes.insert(0, f"PGD-{p['steps']} {p['norm']} ε {p['eps'] * (255 if p['norm'] == 'linf' else 1):.3g}"
                    f"{'/255' if p['norm'] == 'linf' else ''}")
    if report.get("settings_differ"):
        notes.append(f"modes evaluated with different settings: {', '.join(report['settings_differ'])}")
    table.caption = "; ".join(notes)
    return table


def suite_key(settings: Mapping[str, Any]) -> str:
    """The folder name of a suite evaluation setting: evaluation/<key>/<MODE>.json."""
    return settings_key({"protocol": "suite", **settings})


def legacy_suite_results(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Per-mode results of the single-folder layout (evaluation/<MODE>.json), written before settings were kept
    apart; each holds its settings, so it still loads and moves into its setting's folder when the mode is
    evaluated again."""
    found = {}
    for mode in ("SLF", "ALF", "AFF"):
        path = Path(out_dir) / "evaluation" / f"{mode}.json"
        if path.is_file():
            found[mode] = json.loads(path.read_text())
    return found


def forget_evaluations(out_dir: Path, mode: str) -> None:
    """Remove every evaluation of ``mode`` (all settings): called when its fine-tuned model is replaced, so that no
    result of the old model is read as one of the new."""
    eval_dir = Path(out_dir) / "evaluation"
    for path in [eval_dir / f"{mode}.json", *eval_dir.glob(f"*/{mode}.json")]:
        path.unlink(missing_ok=True)
        if path.parent != eval_dir and not list(path.parent.glob("[SA][LF]F.json")):
            shutil.rmtree(path.parent, ignore_errors=True)  # the setting's report and plot described only these


def evaluate_finetuned(out_dir: Path, modes: list[str], opts: SuiteOptions, overrides: list[str] = (),
                       force: bool = False) -> dict[str, Any]:
    """Evaluate <out_dir>/finetune/<MODE> models; writes evaluation/<key>/<MODE>.json, report.json and
    eps_curve.png, ``key`` naming the suite settings: other settings are kept, ``force`` replaces the same."""
    out_dir = Path(out_dir)
    eval_dir = out_dir / "evaluation"
    todo = [m for m in modes if (mode_dir(out_dir, m) / "config.json").is_file()]
    if not todo:
        raise UserError(f"{out_dir}: no fine-tuned model for {', '.join(modes)}; run `rsslctl finetune` first")
    legacy = legacy_suite_results(out_dir)
    plans = []
    for mode in todo:  # every refusal before anything is measured
        info = json.loads((mode_dir(out_dir, mode) / "config.json").read_text())
        # a fine-tuned classifier needs no pretraining plugins: only its data, engine and evaluation settings
        raw = {"data": dict(info["data"]), "engine": dict(info["engine"])}
        recipe = resolve(raw, list(overrides), "evaluation", only=())
        ev = recipe.evaluation
        mode_opts = dataclasses.replace(opts, attack=ev.attack, single_step_attack=ev.single_step_attack,
                                        clamp_start=ev.clamp_start, test_limit=opts.test_limit or ev.limit)
        key = suite_key(suite_settings(mode_opts))  # what the result stores, so a stored result names its folder
        refuse_existing(eval_dir / key / f"{mode}.json", "evaluation with these settings", force,
                        " (other settings are kept apart and need no --force)")
        if mode in legacy and suite_key(legacy[mode].get("settings", {})) == key:
            refuse_existing(eval_dir / f"{mode}.json", "evaluation with these settings", force)
        plans.append((mode, recipe, mode_opts, key))
    for mode, recipe, mode_opts, key in plans:
        console.print(f"evaluating {mode}", highlight=False)
        device = setup_device(recipe)
        net, info = load_classifier(mode_dir(out_dir, mode), device)
        test = load_split(recipe, recipe.data.test_split)
        limit = mode_opts.test_limit
        if limit:
            test = test.subset(torch.arange(min(limit, len(test))))
        (eval_dir / key).mkdir(parents=True, exist_ok=True)
        state_key = hashlib.sha256(json.dumps([mode, len(test), opts.eps, opts.norm, opts.aa_version,
                                               opts.aa_attacks, opts.aa_limit, opts.seed]).encode()).hexdigest()[:10]
        state = eval_dir / f"autoattack-{mode}-{state_key}.state.json"
        if force and state.exists() and (eval_dir / key / f"{mode}.json").exists():
            state.unlink()  # a forced re-evaluation starts AutoAttack afresh; an interrupted one resumes
        result = evaluate_model(net, test, recipe.dataset.cls.corruption_folder, Path(recipe.data.root), mode_opts,
                                device, state)
        result = {"mode": mode, "model": str(mode_dir(out_dir, mode) / "model.safetensors"),
                  "dataset": recipe.dataset.name, "finetune": info["config"], **result}
        atomic_write_text(eval_dir / key / f"{mode}.json", json.dumps(result, indent=2))
        if mode in legacy:  # the old single-folder result: replaced when its settings were these, else kept
            old_key = suite_key(legacy[mode].get("settings", {}))
            if old_key != key and not (eval_dir / old_key / f"{mode}.json").exists():
                (eval_dir / old_key).mkdir(exist_ok=True)
                atomic_write_text(eval_dir / old_key / f"{mode}.json", json.dumps(legacy[mode], indent=2))
                write_report(out_dir, old_key)
            (eval_dir / f"{mode}.json").unlink()
    keys = list(dict.fromkeys(p[3] for p in plans))  # one key unless --set gave the modes different settings
    for key in keys[1:]:
        write_report(out_dir, key)
    return write_report(out_dir, keys[0])

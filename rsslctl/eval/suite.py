"""The robustness suite of a classifier on pixels in [0, 1]: clean, FGSM, PGD-k, AutoAttack, common corruptions and
the accuracy-vs-ε curve, with the RobustSSL leaderboard fields and the report written from per-mode results."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rsslctl.adversary.attack import make_attack
from rsslctl.run.build import load_split, setup_device
from rsslctl.runtime.checkpoint import atomic_write_text
from rsslctl.train.classify import accuracy, load_classifier, mode_dir
from rsslctl.base.errors import UserError
from rsslctl.base.console import err_console as console  # status lines go to stderr, so `--json` stdout stays parseable
from rsslctl.run.recipe import resolve
from rsslctl.run.directory import refuse_existing


@dataclasses.dataclass(frozen=True)
class SuiteOptions:
    """What `rsslctl evaluate --mode` measures; the defaults are the RobustSSL benchmark's protocol. The attack
    plugins come from the recipe's [evaluation] table (``attack``, ``single_step_attack``, ``clamp_start``)."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    pgd_steps: int = 20
    norm: str = "linf"
    fgsm: bool = True
    autoattack: bool = False
    aa_version: str = "standard"
    aa_attacks: tuple[str, ...] = ()
    aa_limit: int = 0
    aa_batch: int = 128
    corruptions: bool = False
    corruption_dir: str = ""
    corruption_limit: int = 0
    eps_curve: tuple[float, ...] = ()
    test_limit: int = 0
    seed: int = 0
    batch_size: int = 256
    attack: str = ""
    single_step_attack: str = ""
    clamp_start: bool = True

    def make(self, name: str, **values: Any) -> Any:
        """The attack plugin ``name`` with this suite's norm and start clipping (keys it does not take are dropped)."""
        return make_attack(name, "evaluation", known_only=True, norm=self.norm, clamp_start=self.clamp_start, **values)


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
    kwargs: dict[str, Any] = {"eps": opts.eps, "norm": norm, "version": opts.aa_version, "device": device, "seed": opts.seed}
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
        state = {"attacks": attacks, "done": [], "clean": correct.tolist(), "robust": correct.tolist(), "max_delta": 0.0}
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
                bad = torch.cat([C.generate(chunk.float().div(255), name, s, g) for chunk in images.split(opts.batch_size)])
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
    out["clean_accuracy"] = accuracy(model, x, y, device, batch=opts.batch_size)
    console.print(f"  clean accuracy {100 * out['clean_accuracy']:.2f} % on {len(y)} images", highlight=False)
    if opts.fgsm:
        torch.manual_seed(opts.seed)
        out["fgsm"] = {"attack": opts.single_step_attack, "eps": opts.eps, "norm": opts.norm, "accuracy": accuracy(
            model, x, y, device, opts.make(opts.single_step_attack, eps=opts.eps), batch=opts.batch_size)}
    torch.manual_seed(opts.seed)
    pgd = opts.make(opts.attack, eps=opts.eps, step_size=opts.step_size, steps=opts.pgd_steps)
    out["pgd"] = {"eps": opts.eps, "step_size": opts.step_size, "steps": opts.pgd_steps, "norm": opts.norm,
                  "attack": opts.attack, "random_start": True, "clamp_start": opts.clamp_start,
                  "accuracy": accuracy(model, x, y, device, pgd, batch=opts.batch_size)}
    console.print(f"  {opts.attack}-{opts.pgd_steps} accuracy {100 * out['pgd']['accuracy']:.2f} %", highlight=False)
    if opts.autoattack:
        out["autoattack"] = autoattack_accuracy(model, x, y, opts, device, state_path)
    if opts.corruptions:
        out["corruption"] = corruption_accuracy(model, test, corruption_folder, data_root, opts, device)
    curve = []
    for eps in opts.eps_curve:
        torch.manual_seed(opts.seed)
        attack = None if eps == 0 else opts.make(opts.attack, eps=eps, step_size=eps / 4, steps=opts.pgd_steps)
        curve.append({"eps": eps, "accuracy": accuracy(model, x, y, device, attack, batch=opts.batch_size)})
    out["eps_curve"] = curve
    out["leaderboard"] = leaderboard_fields(out)
    return out


def aa_subset(n: int, limit: int, seed: int) -> Tensor:
    """The seeded, sorted subset of ``limit`` of ``n`` test images that AutoAttack (and so the whole suite) uses."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def suite_settings(opts: SuiteOptions) -> dict[str, Any]:
    """The settings that decide a result's numbers (stored with every mode's result)."""
    keep = ("eps", "step_size", "pgd_steps", "norm", "attack", "single_step_attack", "clamp_start", "autoattack",
            "aa_version", "aa_attacks", "aa_limit", "corruptions", "corruption_limit", "test_limit", "seed")
    return {k: v for k, v in dataclasses.asdict(opts).items() if k in keep}


def leaderboard_fields(result: dict[str, Any]) -> dict[str, Any]:
    """SA / RA / CA in percent as on the RobustSSL leaderboard (RA = AutoAttack only); what did not run is absent."""
    aa, corr = result.get("autoattack"), result.get("corruption")
    fields: dict[str, Any] = {"SA": round(100 * result["clean_accuracy"], 2), "PGD": round(100 * result["pgd"]["accuracy"], 2)}
    if aa:
        fields["RA"] = round(100 * aa["robust_accuracy"], 2)
    if corr:
        fields["CA"] = round(100 * corr["mean"], 2)
        fields.update({f"CS-{s}": round(100 * corr["per_severity"][s], 2) for s in ("1", "2", "3", "4", "5")})
        fields["CA_generated"] = corr["generated"]
    return fields


def write_report(out_dir: Path) -> dict[str, Any]:
    """Rebuild evaluation/report.json and eps_curve.png from the per-mode result files (a derived summary)."""
    eval_dir = Path(out_dir) / "evaluation"
    modes = {}
    for mode in ("SLF", "ALF", "AFF"):
        path = eval_dir / f"{mode}.json"
        if path.is_file():
            modes[mode] = json.loads(path.read_text())
    report = {"protocol": "RobustSSL benchmark (docs/methods.md, Evaluation): fine-tuned classifier, eval mode; SA = clean, "
                          "RA = AutoAttack, CA = mean corruption accuracy over severities 1-5 (percent)",
              "leaderboard": {m: r["leaderboard"] for m, r in modes.items()}, "modes": modes}
    differ = sorted({k for r in modes.values() for k, v in r.get("settings", {}).items()
                     if any(o.get("settings", {}).get(k) != v for o in modes.values())})
    if differ:  # modes evaluated at different times with different flags: say so instead of merging silently
        report["settings_differ"] = differ
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def report_table(report: dict[str, Any]) -> Any:
    """The report as a rich table: one row per mode, accuracies in percent."""
    from rich.table import Table

    table = Table(title="robustness report (accuracy %)")
    cols = [("SA", lambda r: r["clean_accuracy"]), ("FGSM", lambda r: r.get("fgsm", {}).get("accuracy")),
            ("PGD", lambda r: r["pgd"]["accuracy"]), ("AA (RA)", lambda r: (r.get("autoattack") or {}).get("robust_accuracy")),
            ("CA", lambda r: (r.get("corruption") or {}).get("mean"))]
    cols += [(f"CS-{s}", lambda r, s=s: (r.get("corruption") or {}).get("per_severity", {}).get(s)) for s in "135"]
    table.add_column("mode", style="bold")
    for name, _ in cols:
        table.add_column(name, justify="right")
    table.add_column("test images", justify="right")
    for mode, r in report["modes"].items():
        cells = [f"{100 * v:.2f}" if v is not None else "–" for v in (get(r) for _, get in cols)]
        table.add_row(mode, *cells, str(r["test_images"]))
    notes = []
    for mode, r in report["modes"].items():
        if r.get("corruption", {}).get("generated"):
            notes.append(f"{mode}: CA from GENERATED corruptions ({len(r['corruption']['corruptions'])} of 15), not CIFAR-C files")
        if r.get("autoattack"):
            aa = r["autoattack"]
            notes.append(f"{mode}: AutoAttack {aa['version']} ({', '.join(aa['attacks'])}) on {aa['images']} images")
    p = next(iter(report["modes"].values()))["pgd"]
    notes.insert(0, f"PGD-{p['steps']} {p['norm']} ε {p['eps'] * (255 if p['norm'] == 'linf' else 1):.3g}"
                    f"{'/255' if p['norm'] == 'linf' else ''}")
    if report.get("settings_differ"):
        notes.append(f"modes evaluated with different settings: {', '.join(report['settings_differ'])}")
    table.caption = "; ".join(notes)
    return table


def evaluate_finetuned(out_dir: Path, modes: list[str], opts: SuiteOptions, overrides: list[str] = (),
                       force: bool = False) -> dict[str, Any]:
    """Evaluate <out_dir>/finetune/<MODE> models; writes evaluation/<MODE>.json, report.json and eps_curve.png."""
    out_dir = Path(out_dir)
    eval_dir = out_dir / "evaluation"
    todo = [m for m in modes if (mode_dir(out_dir, m) / "config.json").is_file()]
    if not todo:
        raise UserError(f"{out_dir}: no fine-tuned model for {', '.join(modes)}; run `rsslctl finetune` first")
    for m in todo:
        refuse_existing(eval_dir / f"{m}.json", "evaluation", force)
    eval_dir.mkdir(parents=True, exist_ok=True)
    for mode in todo:
        console.print(f"evaluating {mode}", highlight=False)
        info = json.loads((mode_dir(out_dir, mode) / "config.json").read_text())
        # a fine-tuned classifier needs no pretraining plugins: only its data, engine and evaluation settings
        raw = {"data": dict(info["data"]), "engine": dict(info["engine"])}
        recipe = resolve(raw, list(overrides), "evaluation", only=())
        ev = recipe.evaluation
        mode_opts = dataclasses.replace(opts, attack=ev.attack, single_step_attack=ev.single_step_attack,
                                        clamp_start=ev.clamp_start)
        device = setup_device(recipe)
        net, info = load_classifier(mode_dir(out_dir, mode), device)
        test = load_split(recipe, recipe.data.test_split)
        limit = opts.test_limit or ev.limit
        if limit:
            test = test.subset(torch.arange(min(limit, len(test))))
        key = hashlib.sha256(json.dumps([mode, len(test), opts.eps, opts.norm, opts.aa_version, opts.aa_attacks,
                                         opts.aa_limit, opts.seed]).encode()).hexdigest()[:10]
        state = eval_dir / f"autoattack-{mode}-{key}.state.json"
        if force and state.exists() and (eval_dir / f"{mode}.json").exists():
            state.unlink()  # a forced re-evaluation starts AutoAttack afresh; an interrupted one resumes
        result = evaluate_model(net, test, recipe.dataset.cls.corruption_folder, Path(recipe.data.root), mode_opts,
                                device, state)
        result = {"mode": mode, "model": str(mode_dir(out_dir, mode) / "model.safetensors"),
                  "dataset": recipe.dataset.name, "finetune": info["config"], **result}
        atomic_write_text(eval_dir / f"{mode}.json", json.dumps(result, indent=2))
    return write_report(out_dir)

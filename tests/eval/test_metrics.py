"""One extension point for evaluation metrics: a metric registered in one place is computed by the suite, shown in
the report and the leaderboard, and selected by a flag of its own; the built-in flags come from SuiteOptions."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import click
import pytest
import torch
from cli_helpers import TinyLinear
from click.testing import CliRunner
from rich.console import Console

from rsslctl.cli.common import suite_from_flags, suite_options
from rsslctl.data.dataset import ImageData
from rsslctl.eval.metrics import METRICS, Metric, Setting, register_metric, unregister_metric
from rsslctl.eval.suite import SuiteOptions, evaluate_model, report_table, suite_settings

CPU = torch.device("cpu")


def _worst_of_two(c: Any) -> dict[str, Any] | None:
    """Accuracy on images that are correct both clean and under the suite's PGD: a metric the suite lacks."""
    if not c.opts.extra["worst_of_two"]:
        return None
    torch.manual_seed(c.opts.seed)
    pgd = c.opts.make(c.opts.attack, eps=c.opts.eps, step_size=c.opts.step_size, steps=c.opts.pgd_steps)
    return {"accuracy": min(c.result["clean_accuracy"], c.accuracy(pgd)), "scale": c.opts.extra["worst_scale"]}


EXTRA = Metric("worst_of_two", _worst_of_two,
               settings=(Setting("worst_of_two", False, "Also report the worst of clean and PGD accuracy.", "flag"),
                         Setting("worst_scale", 3, "A setting of the new metric.", "int", lo=1, hi=9)),
               columns=(("WORST", lambda r: (r.get("worst_of_two") or {}).get("accuracy")),),
               fields=lambda r: {"WORST": round(100 * r["worst_of_two"]["accuracy"], 2)},
               notes=lambda mode, r: [f"{mode}: worst of two at scale {r['worst_of_two']['scale']}"])


@pytest.fixture
def extra_metric() -> Iterator[Metric]:
    register_metric(EXTRA)
    try:
        yield EXTRA
    finally:
        unregister_metric(EXTRA.key)


def flags_to_options(*args: str) -> SuiteOptions:
    """The SuiteOptions a command with the suite's flags builds from ``args``."""
    got = []

    @click.command()
    @suite_options
    def command(**kw: Any) -> None:
        got.append(suite_from_flags(kw))
    result = CliRunner().invoke(command, list(args))
    assert result.exit_code == 0, result.output
    return got[0]


def tiny_test() -> ImageData:
    torch.manual_seed(2)
    return ImageData(torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (24,)),
                     [str(i) for i in range(10)], "t")


def test_flag_defaults_are_the_options_defaults() -> None:
    assert flags_to_options() == SuiteOptions()
    opts = flags_to_options("--eps", "4/255", "--eps-curve", "0,2", "--eval-seed", "3", "--no-fgsm")
    assert (opts.eps, opts.eps_curve, opts.seed, opts.fgsm) == (4 / 255, (0.0, 2 / 255), 3, False)


def test_a_registered_metric_is_selectable_computed_and_reported(extra_metric: Metric, tmp_path) -> None:
    assert "--worst-of-two" in CliRunner().invoke(click.command()(suite_options(lambda **kw: None)), ["--help"]).output
    off = flags_to_options()
    on = flags_to_options("--worst-of-two", "--worst-scale", "5")
    assert off.extra == {"worst_of_two": False, "worst_scale": 3} and on.extra == {"worst_of_two": True,
                                                                                 "worst_scale": 5}
    assert suite_settings(on)["worst_scale"] == 5  # stored with each result
    model, test = TinyLinear().eval(), tiny_test()
    results = {}
    for mode, opts in (("SLF", on), ("ALF", off)):
        opts = dataclasses.replace(opts, attack="pgd", single_step_attack="fgsm", pgd_steps=2, eps_curve=())
        results[mode] = evaluate_model(model, test, "", tmp_path, opts, CPU, tmp_path / "aa.json")
    measured = results["SLF"]["worst_of_two"]["accuracy"]
    assert measured == min(results["SLF"]["clean_accuracy"], results["SLF"]["pgd"]["accuracy"])
    assert results["SLF"]["leaderboard"]["WORST"] == round(100 * measured, 2)
    assert "worst_of_two" not in results["ALF"] and "WORST" not in results["ALF"]["leaderboard"]
    console = Console(width=200, record=True)
    console.print(report_table({"modes": results}))
    text = console.export_text()
    assert "WORST" in text and f"{100 * measured:.2f}" in text and "SLF: worst of two at scale 5" in text


def test_the_builtin_metrics_run_in_their_order() -> None:
    assert list(METRICS)[:6] == ["clean_accuracy", "fgsm", "pgd", "autoattack", "corruption", "eps_curve"]
    with pytest.raises(ValueError, match="already registered"):
        register_metric(METRICS["pgd"])

"""benchmarks/gpu_check.py: one clear line without CUDA, and its whole flow on the CPU (``--cpu-smoke``)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_without_cuda_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _script().main(["--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpu_check: no CUDA device") and "\n" not in err and "--cpu-smoke" in err
    assert not (tmp_path / "x.json").exists()


def test_unknown_configuration_is_refused(capsys: pytest.CaptureFixture) -> None:
    assert _script().main(["--cpu-smoke", "--configs", "fp32,fp8"]) == 2
    assert "unknown configuration(s) fp8" in capsys.readouterr().err


def test_synthetic_cifar_is_read_by_the_real_loader(tmp_path: Path) -> None:
    from rsslctl_plugins.datasets.cifar import Cifar10
    _script().write_cifar10(tmp_path, 23, 4)
    train, test = Cifar10(None, tmp_path).load("train"), Cifar10(None, tmp_path).load("test")
    assert tuple(train.images.shape) == (23, 3, 32, 32) and len(test) == 4 and train.classes[0] == "c0"


@pytest.mark.slow  # about a minute on the 2-core CI machine: three tiny ACL runs and a pytest subprocess
def test_cpu_smoke_runs_the_whole_flow(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    assert _script().main(["--cpu-smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["cpu_smoke"] and report["versions"]["torch"] == torch.__version__
    assert report["cuda_tests"]["exit_code"] in (0, 5) and report["cuda_tests"]["counts"]
    rows = report["acl_epoch"]
    for name in ("fp32", "bf16", "bf16+channels_last"):
        assert rows[name]["epoch_s"] > 0 and len(rows[name]["epoch_s_all"]) == 2, rows[name]
    assert "skipped" in rows["bf16+channels_last+compile"]
    assert "epoch_s" in report["ddp"] or report["ddp"]["skipped"]
    assert report["decode"]["ratios"] and "error" not in report["decode"], report["decode"]


def test_the_cuda_tests_are_found_in_the_test_tree() -> None:
    """The CUDA-marked tests live in sub-folders of tests/ (tests mirror the package)."""
    names = {Path(f).name for f in _script().cuda_test_files(SCRIPT.parents[1] / "tests")}
    assert {"test_cuda.py", "test_augment.py", "test_distributed.py"} <= names and "test_gpu_check.py" not in names

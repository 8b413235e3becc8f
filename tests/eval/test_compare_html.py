"""The HTML page of `rsslctl compare` in a real headless browser: rows rendered, header clicks sort them, no request
leaves the file. Skipped where no chromium is installed."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_helpers import run
from test_compare import fake_run

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def dump_dom(page: Path, fragment: str = "") -> str:
    """The DOM after the page's scripts ran (``fragment`` drives the page's test hook, e.g. ``click=3,3``)."""
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000", "--dump-dom",
           page.resolve().as_uri() + (f"#{fragment}" if fragment else "")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(BROWSER is None, reason="needs chromium (apt-get install -y chromium)")
def test_html_page_renders_and_sorts_in_chromium(tmp_path: Path) -> None:
    pgd = {"acl": 0.41, "simclr": 0.30, "dynacl": 0.46}
    for method, robust in pgd.items():
        for seed in range(2):
            fake_run(tmp_path / "runs", f"{method}-{seed}", seed, method=method, probe=(0.8, robust + seed / 100),
                     modes={"SLF": (0.7, robust, None, [(0, 0.7), (8, robust)])}, losses=[3.0, 2.0, 1.0])
    page = tmp_path / "compare.html"
    result = run("compare", *map(str, sorted((tmp_path / "runs").iterdir())), "--format", "html", "--out", str(page))
    assert result.exit_code == 0, result.output
    labels = lambda dom: re.findall(r'<tr data-label="method.name=(\w+) · probe"', dom)  # noqa: E731
    dom = dump_dom(page)
    assert len(re.findall(r"<tr data-label=", dom)) == 6 and labels(dom) == ["acl", "dynacl", "simclr"]
    assert dom.count("<svg") == 2 and "<polyline" in dom
    column = 4  # method.name, evaluation, seeds, clean, PGD-20
    assert "PGD-20" in re.findall(r"<th[^>]*>([^<]*)</th>", dom)[column]
    once = dump_dom(page, f"click={column}")  # one click: ascending
    assert f'data-sorted="{column}-asc"' in once and labels(once) == ["simclr", "acl", "dynacl"]
    twice = dump_dom(page, f"click={column},{column}")  # a second click: descending
    assert f'data-sorted="{column}-desc"' in twice and labels(twice) == ["dynacl", "acl", "simclr"]
    by_name = dump_dom(page, "sort=0-desc")
    assert labels(by_name) == ["simclr", "dynacl", "acl"]

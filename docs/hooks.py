"""mkdocs hook: the API reference lists exactly the public plugin API, ``rsslctl.__all__``.

``rsslctl`` loads its names lazily (PEP 562), so each entry is documented at the module that defines it, read from
``rsslctl._EXPORTS``; a name added to or removed from the public API appears on or leaves the page by itself.
"""
from __future__ import annotations

import rsslctl

PLACEHOLDER = "<!-- public-api -->"
LAYERS = {
    "base": "Errors, options, limits, console, plugin lookup",
    "runtime": "Processes and checkpoint files",
    "nn": "Networks, losses, momentum encoders, optimisers",
    "data": "Datasets and augmentation",
    "adversary": "Attacks and adversarial training",
    "method": "Methods, memory, coreset selection",
    "run": "Recipes, run directories, assembly",
    "train": "Classifier training and fine-tuning",
    "cli": "Command plugins",
}


def api_markdown() -> str:
    groups: dict[str, list[tuple[str, str]]] = {layer: [] for layer in LAYERS}
    for public, target in rsslctl._EXPORTS.items():
        module, _, attribute = target.partition(":")
        groups[module.split(".")[1]].append((public, f"{module}.{attribute or public}"))
    lines = []
    for layer, entries in groups.items():
        lines += [f"## {LAYERS[layer]} (`rsslctl.{layer}`)", "",
                  "| `from rsslctl import …` | defined in |", "|---|---|"]
        for public, path in entries:
            lines.append(f"| [`{public}`](#{path}) | `{path}` |")
        lines.append("")
        for public, path in entries:
            lines += [f"::: {path}", "    options:", f"      heading: \"{public}\"",
                      f"      toc_label: \"{public}\"", ""]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 (mkdocs hook signature)
    if page.file.src_uri == "api.md":
        assert PLACEHOLDER in markdown, "docs/api.md lost its <!-- public-api --> placeholder"
        return markdown.replace(PLACEHOLDER, api_markdown())
    return markdown

"""The built-in plugin verbs, declared lazily: ``rsslctl --help`` lists them without importing their modules."""
from __future__ import annotations

from rsslctl import Declared, hookimpl

DECLARED = [
    Declared("command", "dynacl-pp", "dynacl_pp",
             "DynACL++ post-processing of RUN_DIR: k-means pseudo labels, linear probing, pseudo-label TRADES."),
    Declared("command", "import", "reference_checkpoints",
             "Convert a released reference checkpoint (.pt) into an rsslctl run directory."),
]


@hookimpl
def rsslctl_declarations() -> list[Declared]:
    return DECLARED

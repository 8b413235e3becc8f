"""Layer 8, the command line: one click group (``app``) wiring the built-in verbs, one module each, and the verbs
plugins add through the ``rsslctl_commands`` hook."""
from rsslctl.cli.app import main

__all__ = ["main"]

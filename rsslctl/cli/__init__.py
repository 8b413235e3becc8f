"""Layer 8, the command line: one click group (``app``) wiring the built-in verbs, one module each, and the verbs
plugins add through the ``rsslctl_commands`` hook."""
import sys

try:  # importing torch and the plugins takes seconds: Ctrl-C then is one line too, not an import traceback
    from rsslctl.cli.app import main
except KeyboardInterrupt:
    sys.stderr.write("interrupted (SIGINT) while starting; nothing was done\n")
    raise SystemExit(130) from None

__all__ = ["main"]

"""rsslctl: robust self-supervised learning toolkit."""
import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations (see rsslctl.hookspecs).
hookimpl = pluggy.HookimplMarker("rsslctl")

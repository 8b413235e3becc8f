"""A plugin that fails on import (tests check that rsslctl reports it and keeps working)."""
raise ImportError("example plugin is broken on purpose")

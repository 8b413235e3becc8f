"""The built-in CLI verbs, one module each; ``rsslctl.cli`` wires them (and plugin verbs) into one click group."""

"""Built-in backbones plugins: ordinary plugins, registered through the rsslctl entry-point group."""

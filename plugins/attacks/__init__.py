"""Built-in attacks plugins: ordinary plugins, registered through the rsslctl entry-point group."""

"""Built-in methods plugins: ordinary plugins, registered through the rsslctl entry-point group."""

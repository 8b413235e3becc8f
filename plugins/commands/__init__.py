"""Built-in commands plugins: ordinary plugins, registered through the rsslctl entry-point group."""

"""Built-in datasets plugins: ordinary plugins, registered through the rsslctl entry-point group."""

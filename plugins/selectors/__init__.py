"""Built-in selectors plugins: ordinary plugins, registered through the rsslctl entry-point group."""

"""Layer 0, what every layer uses: user errors, declarative options, the absurd-value limits, the plugin registry and
its hook specifications, console output. Imports no torch."""

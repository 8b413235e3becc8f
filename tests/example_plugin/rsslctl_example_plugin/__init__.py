"""Example third-party plugin package for rsslctl."""

"""``python -m rsslctl``: the same as the ``rsslctl`` command."""
from rsslctl.cli.app import main

main()

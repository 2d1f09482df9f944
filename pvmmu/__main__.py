"""``python -m pvmmu`` is the ``pvmmu`` command."""

from pvmmu.cli import main

main()

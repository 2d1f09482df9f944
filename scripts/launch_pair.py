#!/usr/bin/env python3
"""Start a paired host and guest, run a workload, print the report.

A thin wrapper: ``scripts/launch_pair.py --mode direct --ops 2000`` is
``pvmmu run --mode direct --ops 2000``; every option of ``pvmmu run`` works.
To drive the two processes yourself instead, see the README ("By hand").
"""

import sys

from pvmmu.cli import main

if __name__ == "__main__":
    main(["run", *sys.argv[1:]], prog_name="launch_pair.py")

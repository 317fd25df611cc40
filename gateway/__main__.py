"""`python -m gateway [serve options]` = `gateway serve`."""

import sys

from gateway.cli import main

argv = sys.argv[1:]
if not argv or argv[0].startswith("-"):
    argv = ["serve", *argv]
sys.exit(main(argv))

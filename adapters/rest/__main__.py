"""``python -m adapters.rest``: the same as ``chatrpc rest`` (one parser owns the flags)."""

import sys

from chatrpc.cli import main

main(["rest", *sys.argv[1:]])

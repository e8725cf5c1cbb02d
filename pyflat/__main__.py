"""``python -m pyflat``: the command line (see pyflat/cli.py)."""
import sys

from .cli import main

sys.exit(main())

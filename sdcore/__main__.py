"""`python -m sdcore`: the `sdcore` command (the console script `sdcore`; `python -m sdcore.cli` is the same)."""
import sys

from .cli import main

sys.exit(main())

"""`python -m sdcore.cli`: the `sdcore` command."""
import sys

from . import main

sys.exit(main())

"""`python -m edgequant`: the command line, for environments without the console script on PATH."""

from .cli import main

raise SystemExit(main())

"""`python -m edgequant`: the command line, for environments without the console script on PATH."""

from .cli.main import main

raise SystemExit(main())

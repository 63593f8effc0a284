"""`python -m orchestrator`: the `orchestrator` command, where the console script is not on PATH."""

from orchestrator.cli import main

raise SystemExit(main())

"""`python -m orchestrator`: the `orchestrator` command, where the console script is not on PATH."""

from orchestrator.entry import main

if __name__ == "__main__":  # imported (by a doc tool, a spawned process), it runs nothing
    raise SystemExit(main())

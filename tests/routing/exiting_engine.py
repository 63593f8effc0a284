"""A plugin module that ends the process as it is imported (a licence check calling sys.exit())."""

raise SystemExit("acme: no licence")

"""An engine plug-in whose module fails as it is imported (tests/routing/test_registry.py)."""

raise RuntimeError("a module that fails as it is imported")

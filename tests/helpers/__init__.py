"""What several test files share: config writers and run readers, multi-rank launchers, reference maths.

Imported as `from helpers.runs import write_config` (tests/ is on the path: pytest prepends conftest.py's
folder, and the processes tests spawn inherit it)."""

"""Forge's `backend` package, reduced to its model manager (put on sys.path only when a test plays Forge)."""

"""Example services built on rtbroadcast's public API (run them from the repository root)."""

"""Fuzz tests (issue 12): Hypothesis on the config loader, the pure parsers and raw frames."""

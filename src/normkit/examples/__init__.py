"""Runnable examples: ``python -m normkit.examples.<name>`` (see each module's docstring)."""

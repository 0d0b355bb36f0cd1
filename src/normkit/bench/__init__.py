"""``normkit bench``: kernel and end-to-end benchmarks with a roofline (see :mod:`.cli`)."""

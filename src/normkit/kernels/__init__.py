"""Hand-written kernels: ``cpu`` (Numba) and ``triton``. Arrays in, arrays out; nothing of normkit."""

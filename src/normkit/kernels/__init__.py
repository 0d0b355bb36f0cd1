"""Hand-written kernels: ``triton`` (tensors in, out; nothing of normkit). CPU kernels: C++, ``normkit/csrc``."""

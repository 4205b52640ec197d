"""labkit's Triton kernels, installed as `labkit_kernels` (a bare `kernels` would shadow the PyPI
distribution of that name). Each kernel will sit beside its plain-torch reference; today the
engine's only attention implementation is the torch reference in labkit/layers/attention.py."""

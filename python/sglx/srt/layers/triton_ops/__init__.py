"""Triton kernels shared by the model layers (importing a submodule imports triton)."""

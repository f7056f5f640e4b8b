"""Triton kernels, shipped as ``pml_scale.kernels`` (a PyPI package named ``kernels`` exists)."""

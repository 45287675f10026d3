"""GenMask in JAX: segmentation by generating the mask with the WAN 2.1 diffusion transformer."""

__version__ = "0.1.0"

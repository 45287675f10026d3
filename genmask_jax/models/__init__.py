"""Flax (Linen) models: the WAN DiT, the WAN VAE and the GenMask task assembly.

Models never import data, train or eval code.
"""

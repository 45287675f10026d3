"""Converters from the public PyTorch WAN checkpoints (diffusers and original layouts) to Flax."""

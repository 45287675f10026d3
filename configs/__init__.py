"""Experiment configs: one `get_config(arg)` per file, tiny variants inside the same file."""

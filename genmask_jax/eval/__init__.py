"""Segmentation metrics and the batch evaluation job."""

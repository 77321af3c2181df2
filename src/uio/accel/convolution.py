"""Faster versions of the VQGAN's seam operations (being moved here)."""
FAST_OPS: dict = {}

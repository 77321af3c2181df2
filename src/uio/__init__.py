"""Unified-IO in PyTorch."""

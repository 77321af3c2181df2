"""Acceleration: faster versions of the seam's operations (:mod:`uio.model.ops`) and all they keep."""

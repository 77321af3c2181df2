"""Compatibility module: the helpers the original ``uio.utils`` exposed, under the same names."""
from __future__ import annotations

import os

import numpy as np

from .checkpoint import load_checkpoint_file
from .processing import (  # noqa: F401  (re-exported)
    extract_keypoints, extract_segmentation_masks, preprocess_image, preprocess_target_image, region_to_tokens,
    tokens_to_regions, transpose_lists, undo_image_preprocessing)
from .tree import nest_paths


def load_checkpoint(checkpoint: str | os.PathLike) -> dict:
    """Read a checkpoint into the nested parameter tree of the original (``{"encoder": {...}}``).

    The leaves are read-only numpy views of the memory-mapped file.
    """
    leaves = load_checkpoint_file(checkpoint)
    return nest_paths({path: leaf if isinstance(leaf, np.ndarray) else leaf.numpy() for path, leaf in leaves.items()})

"""Compatibility module: the helpers the original ``uio.utils`` exposed, under the same names."""
from __future__ import annotations

import os

import numpy as np
import torch

from .checkpoint import load_checkpoint_file
from .processing import (  # noqa: F401  (re-exported)
    extract_keypoints, extract_segmentation_masks, preprocess_image, preprocess_target_image, region_to_tokens,
    tokens_to_regions, transpose_lists, undo_image_preprocessing)
from .tree import nest_paths


def load_checkpoint(checkpoint: str | os.PathLike) -> dict:
    """Read a checkpoint into the nested parameter tree of the original (``{"encoder": {...}}``).

    The leaves are numpy arrays: read-only views of the memory-mapped file, except bfloat16 leaves (a
    ``.safetensors`` file from ``uio convert --dtype bf16``), which numpy cannot hold: those are widened
    to float32, which represents every bfloat16 value exactly.
    """
    leaves = load_checkpoint_file(checkpoint)
    return nest_paths({path: _as_numpy(leaf) for path, leaf in leaves.items()})


def _as_numpy(leaf: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(leaf, np.ndarray):
        return leaf
    return (leaf.float() if leaf.dtype == torch.bfloat16 else leaf).numpy()

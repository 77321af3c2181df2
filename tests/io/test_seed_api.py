"""Scripts written for the original package keep working: module names and signatures."""
from __future__ import annotations

import inspect

import numpy as np
import torch

from uio import checkpoint, runner, utils


def test_utils_exports_the_original_helpers():
    for name in ["load_checkpoint", "preprocess_image", "preprocess_target_image", "undo_image_preprocessing",
                 "region_to_tokens", "tokens_to_regions", "extract_keypoints", "extract_segmentation_masks"]:
        assert callable(getattr(utils, name)), name


def test_load_checkpoint_gives_the_nested_tree(conformance):
    tree = utils.load_checkpoint(conformance / "tiny" / "tiny.bin")
    assert sorted(tree) == ["decoder", "discrete_vae", "encoder", "token_embedder"]
    kernel = tree["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert isinstance(kernel, np.ndarray) and kernel.shape == (64, 128)


def test_load_checkpoint_reads_a_bf16_safetensors_file_as_float32(conformance, tmp_path):
    """numpy has no bfloat16: such leaves come back as float32 holding the same values."""
    original = checkpoint.read_bin(conformance / "tiny" / "tiny.bin")
    path = tmp_path / "tiny.safetensors"
    checkpoint.write_safetensors(original, path, dtype=torch.bfloat16)
    tree = utils.load_checkpoint(path)
    kernel = tree["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert isinstance(kernel, np.ndarray) and kernel.dtype == np.float32 and kernel.shape == (64, 128)
    rounded = torch.from_numpy(original["encoder/layers_0/mlp/wi_0/kernel"]).to(torch.bfloat16).float()
    assert np.array_equal(kernel, rounded.numpy())


def test_runner_signatures_match_the_original():
    params = inspect.signature(runner.ModelRunner.__init__).parameters
    assert list(params)[1:8] == ["size", "param_file", "pad_input_to_max", "max_input_len", "max_options",
                                 "compiled", "log_inputs"]
    run = inspect.signature(runner.ModelRunner.run).parameters
    assert list(run)[1:] == ["input_images", "input_texts", "output_text_len", "generate_image", "beam_search",
                             "num_decodes", "answer_options", "mask_regions", "average_loss"]
    expected = {"caption": ["image", "num_decodes"], "vqa": ["image", "question", "num_decodes"],
                "depth": ["image", "num_decodes", "beam_search"],
                "image_inpainting": ["image", "location", "replace_with", "num_decodes"],
                "region_classification": ["image", "location", "num_decodes", "answer_options"],
                "segmentation_based_generation": ["binary_masks", "labels", "num_decodes"]}
    for method, names in expected.items():
        got = list(inspect.signature(getattr(runner.ModelRunner, method)).parameters)[1:]
        assert got[:len(names)] == names, method
    assert runner.GEN_SEGMENTATION_COLOR_NAMES[0] == "white" and len(runner.GEN_SEGMENTATION_COLORS) == 16
    assert set(runner.CONFIGS) == {"small", "base", "large", "xl"}

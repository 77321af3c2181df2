"""uio.processing against the reference goldens, plus its bug fixes and input checks."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from uio import processing as P

_CONFORMANCE = Path(os.environ.get(
    "UIO_CONFORMANCE", Path(__file__).resolve().parents[3] / "shared" / "conformance"))


def _npz_keys(name: str) -> list[str]:
    """Keys of a golden .npz, read at collection time ([] when the oracle is absent)."""
    path = _CONFORMANCE / "golden" / name
    if not path.is_file():
        return []
    with np.load(path) as data:
        return list(data.files)


def _json(name: str) -> dict:
    path = _CONFORMANCE / "golden" / name
    return json.loads(path.read_text()) if path.is_file() else {}


def _names(keys: list[str], pattern: str) -> list[str]:
    """First capture group of every key matching ``pattern``, in file order, deduplicated."""
    found = [m.group(1) for k in keys if (m := re.fullmatch(pattern, k))]
    return list(dict.fromkeys(found))


PRE_KEYS = _npz_keys("preprocessing.npz")
POST_KEYS = _npz_keys("postprocess.npz")
POST_JSON = _json("postprocess.json")

IMAGE_CASES = [n for n in _names(PRE_KEYS, r"([^/]+)/input") if f"{n}/image" in PRE_KEYS]
REGION_CASES = _names(PRE_KEYS, r"([^/]+)/mask_region")
NONE_CASES = _names(PRE_KEYS, r"(none)/image")
TARGET_CASES = _names(PRE_KEYS, r"target/([^/]+)/image")
UNDO_CASES = [tuple(k.split("/")[1:]) for k in PRE_KEYS if re.fullmatch(r"undo/[^/]+/output\w*", k)]
SEG_CASES = _names(POST_KEYS, r"seg/([^/]+/[^/]+)/\d+")
T2R_CASES = list(POST_JSON.get("tokens_to_regions", {}))
KEYPOINT_CASES = list(POST_JSON.get("extract_keypoints", {}))
R2T_CASES = list(range(len(POST_JSON.get("region_to_tokens", []))))


def _token_id(token: str) -> int:
    """Id of an ``<extra_id_N>`` string in the runner's T5 tokenizer (extra_ids=1100)."""
    return P.VOCAB_SIZE - 1 - int(re.fullmatch(r"<extra_id_(-?\d+)>", token).group(1))


class DigitTokenizer:
    """Stands in for T5Tokenizer.decode using the golden's digit ids; other ids are words."""

    def __init__(self, digit_ids: dict[str, list[int]]):
        self.text = {ids[0]: digit for digit, ids in digit_ids.items()}

    def decode(self, ids) -> str:
        return "".join(self.text.get(int(i), " word") for i in ids)


@pytest.fixture(scope="module")
def pre(golden):
    return golden("preprocessing.npz")


# --- preprocessing goldens ----------------------------------------------------------------------

@pytest.mark.parametrize("name", IMAGE_CASES)
def test_preprocess_image_matches_golden(pre, name):
    image, mask = P.preprocess_image(pre[f"{name}/input"])
    assert image.dtype == np.float32 and image.shape == (384, 384, 3)
    assert mask.dtype == np.int32 and mask.shape == (576,)
    np.testing.assert_allclose(image, pre[f"{name}/image"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(mask, pre[f"{name}/mask"])


@pytest.mark.parametrize("name", REGION_CASES)
def test_preprocess_image_mask_region_matches_golden(pre, name):
    image, mask = P.preprocess_image(pre[f"{name}/input"], pre[f"{name}/mask_region"])
    np.testing.assert_array_equal(mask, pre[f"{name}/mask_with_mask_region"])
    np.testing.assert_allclose(image, pre[f"{name}/image"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NONE_CASES)
def test_preprocess_image_none_matches_golden(pre, name):
    image, mask = P.preprocess_image(None)
    np.testing.assert_allclose(image, pre[f"{name}/image"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(mask, pre[f"{name}/mask"])


def _target_input(pre, name):
    if name == "none":
        return None
    return pre.get(f"target/{name}/input", pre.get(f"{name}/input"))


@pytest.mark.parametrize("name", TARGET_CASES)
def test_preprocess_target_image_matches_golden(pre, name):
    inp = _target_input(pre, name)
    image, mask = P.preprocess_target_image(inp)
    assert image.dtype == np.float32 and image.shape == (256, 256, 3)
    np.testing.assert_array_equal(mask, pre[f"target/{name}/mask"])
    if name.startswith("BUG_"):
        # Reference bug 2: its uint8 output wrapped modulo 256; ours is the true [-1, 1] image.
        h, w = inp.shape[:2]
        want = np.pad(inp / 255.0, [[0, 256 - h], [0, 256 - w], [0, 0]]) * 2 - 1
        np.testing.assert_array_equal(image, want.astype(np.float32))
        assert pre[f"target/{name}/image"].dtype == np.uint8  # the golden records the bug
        assert image.min() >= -1 and image.max() <= 1
    else:
        np.testing.assert_allclose(image, pre[f"target/{name}/image"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,output", UNDO_CASES)
def test_undo_image_preprocessing_matches_golden(pre, name, output):
    kwargs = {"mode": "bilinear", "antialias": True} if output.endswith("bilinear_antialias") else {}
    out = P.undo_image_preprocessing(pre["undo/input"], pre[f"undo/{name}/original_size"], **kwargs)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, pre[f"undo/{name}/{output}"], rtol=0, atol=1e-6)


# --- postprocessing goldens ---------------------------------------------------------------------

@pytest.mark.parametrize("case", SEG_CASES)
def test_extract_segmentation_masks_matches_golden(golden, case):
    data = golden("postprocess.npz")
    name, mode = case.split("/")
    count = golden("postprocess.json")["extract_segmentation_masks"][case]
    masks = P.extract_segmentation_masks(data[f"seg/{name}/input"], mode)
    assert len(masks) == count
    for i, mask in enumerate(masks):
        assert mask.dtype == np.bool_
        np.testing.assert_array_equal(mask, data[f"seg/{case}/{i}"])


@pytest.mark.parametrize("key", T2R_CASES)
def test_tokens_to_regions_matches_golden(golden, key):
    case = golden("postprocess.json")["tokens_to_regions"][key]
    tokens, size = case["tokens"], case["image_size"]
    if "raises" in case and P.BIN_START in tokens:
        # Reference bug 4: id 32000 (q = 999) was rejected; ours decodes it like every other id.
        labels, locations = P.tokens_to_regions(tokens, size)
        end = tokens.index(P.EOS_ID)
        yx = (P.VOCAB_SIZE - P.VOCAB_START - np.array(tokens[:4])) * (max(size) / 1000)
        assert [x.tolist() for x in labels] == [tokens[4:end]]
        np.testing.assert_array_equal(locations, yx.reshape(-1, 2)[:, ::-1].reshape(1, 4))
        return
    if "raises" in case:
        assert case["raises"] == "ValueError"
        with pytest.raises(ValueError, match="location tokens at position"):
            P.tokens_to_regions(tokens, size)
        return
    labels, locations = P.tokens_to_regions(tokens, size)
    assert [x.tolist() for x in labels] == case["labels"]
    assert list(locations.shape) == case["locations_shape"]
    assert locations.dtype == np.float64
    assert locations.tolist() == case["locations"]  # exact


@pytest.mark.parametrize("tokenizer_kind", ["digits", "sentencepiece"])
@pytest.mark.parametrize("key", KEYPOINT_CASES)
def test_extract_keypoints_matches_golden(golden, conformance, key, tokenizer_kind):
    data = golden("postprocess.json")
    case = data["extract_keypoints"][key]
    if tokenizer_kind == "digits":
        tokenizer = DigitTokenizer(data["keypoint_digit_ids"])
    else:
        spm = pytest.importorskip("sentencepiece")
        model = spm.SentencePieceProcessor(model_file=str(conformance / "tokenizer" / "spiece.model"))
        tokenizer = type("Sp", (), {"decode": lambda self, ids: model.decode([int(i) for i in ids])})()
    points, labels, invalid = P.extract_keypoints(case["tokens"], tokenizer, case["image_size"])
    assert invalid == case["invalid"]
    if case["points"] is None:
        assert points is None and labels is None and case["labels"] is None
        return
    assert points.shape == (P.NUM_KEYPOINTS, 2) and labels.shape == (P.NUM_KEYPOINTS,)
    assert points.tolist() == case["points"]  # exact
    assert labels.tolist() == case["labels"]


@pytest.mark.parametrize("index", R2T_CASES)
def test_region_to_tokens_matches_golden(golden, index):
    case = golden("postprocess.json")["region_to_tokens"][index]
    tokens = P.region_to_tokens(case["box"], case["img_w"], case["img_h"])
    assert tokens == case["tokens"]
    # Where every string is a location token, the golden's ids are the tokenizer's ids for them.
    if all(P.LOCATION_ID_LAST <= _token_id(t) <= P.LOCATION_ID_FIRST for t in tokens):
        assert [_token_id(t) for t in tokens] == case["ids"]


# --- the reference's runner goldens use these functions too -------------------------------------

def test_runner_inputs_and_outputs_match_golden(golden, test_image):
    runner, calls = golden("runner.npz"), golden("runner.json")
    image, mask = P.preprocess_image(test_image)
    np.testing.assert_allclose(image, runner["common/image_encoder_inputs"][0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(mask, runner["common/image_input_masks"][0])
    location = np.array(calls["image_inpainting"]["args"]["location"])
    _, mask = P.preprocess_image(test_image, location)
    np.testing.assert_array_equal(mask, runner["image_inpainting/run0/inputs/image_input_masks"][0])
    for task in ("depth", "surface_normal"):
        out = P.undo_image_preprocessing(runner[f"{task}/out/image"], test_image.shape[:2])
        np.testing.assert_allclose(out, runner[f"{task}/out/rescaled_image"], rtol=0, atol=1e-6)


def test_runner_segmentation_needs_reference_used_mask_behaviour(golden):
    """Reference bug 3: a model-generated golden depends on the bug, so the fix is opt-in."""
    runner = golden("runner.npz")
    image = runner["object_segmentation/out/image"]
    want = [runner[k] for k in sorted(k for k in runner if k.startswith("object_segmentation/out/mask/"))]
    got = P.extract_segmentation_masks(image)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    fixed = P.extract_segmentation_masks(image, exclude_assigned_pixels=True)
    assert any(not np.array_equal(a, b) for a, b in zip(fixed, want))


# --- bug fixes ------------------------------------------------------------------------------------

def test_uint8_image_with_longest_side_384_is_preprocessed(test_image):
    """Reference bug 1: this crashed (in-place float subtract on uint8); now equals img / 255."""
    img = np.ascontiguousarray(test_image[:384, :200])
    image, mask = P.preprocess_image(img)
    as_float, mask_float = P.preprocess_image(img / 255.0)
    np.testing.assert_array_equal(image, as_float)
    np.testing.assert_array_equal(mask, mask_float)
    np.testing.assert_allclose(image, P.preprocess_image(img.astype(np.float32) / 255)[0], atol=1e-6)
    assert image.dtype == np.float32
    assert mask.reshape(24, 24)[:, :13].all() and not mask.reshape(24, 24)[:, 13:].any()


def test_uint8_target_with_longest_side_256_is_in_range(test_image):
    """Reference bug 2: output wrapped modulo 256; now a [-1, 1] float image."""
    img = np.ascontiguousarray(test_image[:256, :100])
    image, _ = P.preprocess_target_image(img)
    np.testing.assert_array_equal(image, P.preprocess_target_image(img / 255.0)[0])
    assert image.dtype == np.float32
    assert image[:, 100:].max() == -1 and image.min() >= -1 and image.max() <= 1


def _seg_image():
    """Black image with a red disc-like run, a dark-red run and a gray-and-red run."""
    img = np.zeros((8, 40, 3), np.uint8)
    img[1, 5:25] = (200, 20, 20)  # clearly red
    img[3, 5:25] = (75, 10, 5)  # mean 30: background, yet red by > 40 over the mean
    img[5, 5:25] = (145, 55, 100)  # near-gray (white object) and also red by 45
    return img


def test_segmentation_exclude_assigned_pixels_fixes_overlaps():
    """Reference bug 3: background and white pixels also landed in the colour masks."""
    img = _seg_image()
    white, red = P.extract_segmentation_masks(img)  # reference behaviour
    assert red[3, 5:25].all() and red[5, 5:25].all() and white[5, 5:25].all()
    white, red = P.extract_segmentation_masks(img, exclude_assigned_pixels=True)
    assert red[1, 5:25].all() and red.sum() == 20
    assert white[5, 5:25].all() and not (white & red).any()


def test_region_encoding_roundtrip_error_is_bounded():
    """Bug 4 context: encoding uses q/999, decoding (q+1)/1000; error stays below 1/999 of the side."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        w, h = rng.integers(50, 1000, size=2)
        x1, x2 = np.sort(rng.uniform(0, w, 2))
        y1, y2 = np.sort(rng.uniform(0, h, 2))
        ids = [_token_id(t) for t in P.region_to_tokens([x1, y1, x2, y2], w, h)]
        labels, boxes = P.tokens_to_regions(ids + [P.EOS_ID], (h, w))
        assert labels[0].size == 0
        assert np.abs(boxes[0] - [x1, y1, x2, y2]).max() <= max(w, h) / 999


def test_q999_location_ends_a_label():
    """Id 32000 starts a location group, so it no longer becomes part of the previous label."""
    first = [P.location_token_id(q) for q in (1, 2, 3, 4)]
    second = [P.location_token_id(q) for q in (999, 10, 999, 20)]
    labels, boxes = P.tokens_to_regions(first + [95] + second + [96, P.EOS_ID], (100, 200))
    assert [x.tolist() for x in labels] == [[95], [96]]
    np.testing.assert_array_equal(boxes[1], [11 / 5, 200, 21 / 5, 200])


# --- other behaviour ------------------------------------------------------------------------------

def test_location_token_layout():
    assert P.location_token_id(0) == 32999 and P.location_token_id(999) == 32000
    assert P.location_token(0) == "<extra_id_100>" and _token_id(P.location_token(999)) == 32000
    with pytest.raises(ValueError, match="quantised location"):
        P.location_token_id(1000)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_dtypes_agree(test_image, dtype):
    img = test_image[:300, :250]
    if dtype != np.uint8:
        img = (img / 255.0).astype(dtype)
    image, mask = P.preprocess_image(img)
    ref, ref_mask = P.preprocess_image(test_image[:300, :250])
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, ref, atol=1e-5)
    np.testing.assert_array_equal(mask, ref_mask)
    target, _ = P.preprocess_target_image(img)
    np.testing.assert_allclose(target, P.preprocess_target_image(test_image[:300, :250])[0], atol=1e-5)


def test_inputs_are_not_modified(test_image):
    img = (test_image[:384, :300] / 255.0).astype(np.float32)
    copy = img.copy()
    P.preprocess_image(img)
    P.preprocess_target_image(img)
    P.normalize_image(img)
    np.testing.assert_array_equal(img, copy)


def test_negative_mask_region_is_clipped(test_image):
    """The reference let a negative start wrap around (masking nothing here)."""
    _, clipped = P.preprocess_image(test_image, np.array([-50, -50, 100, 100]))
    _, inside = P.preprocess_image(test_image, np.array([0, 0, 100, 100]))
    np.testing.assert_array_equal(clipped, inside)
    assert clipped.sum() < P.preprocess_image(test_image)[1].sum()


def test_extreme_aspect_ratio_keeps_one_pixel():
    image, mask = P.preprocess_image(np.full((2000, 1, 3), 255, np.uint8))
    assert image.shape == (384, 384, 3) and mask.reshape(24, 24)[:, 0].all()
    assert mask.reshape(24, 24)[:, 1:].sum() == 0


def test_undo_accepts_uint8_and_interpolation_mode_objects():
    image = np.full((256, 256, 3), 255, np.uint8)
    mode = type("Mode", (), {"value": "bilinear"})()
    out = P.undo_image_preprocessing(image, (100, 50), mode=mode, antialias=True)
    assert out.shape == (100, 50, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_flattened_run_cleaning_matches_1d_labelling():
    """The reference labels components of the flattened mask: runs, wrapping across rows."""
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(1)
    for p in (0.3, 0.7, 0.95):
        mask = rng.random(5000) < p
        label, n = ndimage.label(mask)
        sizes = np.bincount(label)
        want = (sizes > 10)[label] & mask
        np.testing.assert_array_equal(P._drop_short_runs(mask, 10), want)
    img = np.zeros((2, 20, 3), np.uint8)
    img[0, 14:], img[1, :6] = 255, 255  # 6 + 6 pixels, one run across the row end
    (white,) = P.extract_segmentation_masks(img)
    assert white.sum() == 12


def test_segmentation_float_input_is_clipped():
    img = np.zeros((4, 20, 3), np.float32)
    img[1] = 1.1  # 280.5 after *255: the reference's uint8 cast wraps it to near-black
    (white,) = P.extract_segmentation_masks(img)
    assert white[1].all() and white.sum() == 20
    assert P.extract_segmentation_masks(img, "any_pixel")[0][1].all()


def test_keypoints_all_invisible_or_empty():
    tok = DigitTokenizer({"1": [886]})
    assert P.extract_keypoints([P.EOS_ID], tok, (10, 10)) == (None, None, False)
    assert P.extract_keypoints([32990, 32980, 886, P.EOS_ID], tok, (10, 10)) == (None, None, False)


def test_transpose_lists():
    assert P.transpose_lists([[1, 2, 3], ["a", "b", "c"]]) == [[1, "a"], [2, "b"], [3, "c"]]


# --- input validation -----------------------------------------------------------------------------

_PREPROCESS = {"preprocess_image": P.preprocess_image, "preprocess_target_image": P.preprocess_target_image,
               "undo_image_preprocessing": lambda img: P.undo_image_preprocessing(img, (5, 5))}


_BAD_IMAGES = [
    (np.zeros((10, 10), np.uint8), r"shape \[h, w, (3|c)\]"),
    (np.zeros((10, 10, 4), np.uint8), r"shape \[h, w, 3\]"),
    (np.zeros((0, 10, 3), np.uint8), "empty"),
    (np.zeros((10, 10, 3), np.int64), "dtype int64"),
    ([[[0, 0, 0]]], "numpy array"),
]


@pytest.mark.parametrize("func,image,match", [
    (func, image, match) for func in _PREPROCESS for image, match in _BAD_IMAGES
    # undo takes any channel count (depth maps, normals)
    if not (func.startswith("undo") and np.shape(image)[-1] == 4)
])
def test_bad_images_raise(func, image, match):
    with pytest.raises(ValueError, match=match):
        _PREPROCESS[func](image)


@pytest.mark.parametrize("region,match", [
    ([1, 2, 3], "4 numbers"),
    ([10, 10, 5, 20], "x1 <= x2"),
    ([0, 0, np.nan, 5], "finite"),
    (["a", "b", "c", "d"], "4 numbers"),
])
def test_bad_mask_region_raises(region, match):
    image = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match=match):
        P.preprocess_image(image, region)
    with pytest.raises(ValueError, match=match):
        P.region_to_tokens(region, 20, 20)


def test_mask_region_without_image_raises():
    with pytest.raises(ValueError, match="input_image is None"):
        P.preprocess_image(None, [0, 0, 1, 1])


def test_bad_undo_arguments_raise():
    image = np.zeros((256, 256, 3), np.float32)
    with pytest.raises(ValueError, match="original_size"):
        P.undo_image_preprocessing(image, (0, 10))
    with pytest.raises(ValueError, match="original_size"):
        P.undo_image_preprocessing(image, (10, 10, 3))
    with pytest.raises(ValueError, match="mode"):
        P.undo_image_preprocessing(image, (10, 10), mode="lanczos")


def test_bad_region_to_tokens_size_raises():
    with pytest.raises(ValueError, match="positive"):
        P.region_to_tokens([0, 0, 1, 1], 0, 10)


@pytest.mark.parametrize("tokens,kwargs,match", [
    ([[32999, 32998, 32997, 32996]], {}, "1-D"),
    ([32999.0, 32998.0, 32997.0, 32996.0], {}, "integers"),
    ([32999, 32998, 32997, 32996], {"token_per_label": 3}, "even"),
    ([32999, 32998, 32997, 32996], {"token_per_label": 0}, "even"),
    ([32999, 32998, 32997, 32996], {"image_size": (0, 10)}, "image_size"),
    ([32999, 32998, 32997, 32996, 95, 32999, 32998], {}, "position 5"),
    ([95, 1], {}, "position 0"),
])
def test_bad_tokens_raise(tokens, kwargs, match):
    kwargs = {"image_size": (10, 10), **kwargs}
    with pytest.raises(ValueError, match=match):
        P.tokens_to_regions(tokens, **kwargs)


def test_bad_segmentation_inputs_raise():
    with pytest.raises(ValueError, match="segmention_mode"):
        P.extract_segmentation_masks(np.zeros((4, 4, 3), np.uint8), "fine")
    with pytest.raises(ValueError, match="shape"):
        P.extract_segmentation_masks(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        P.extract_segmentation_masks(np.full((4, 4, 3), np.nan, np.float32))


def test_images_and_tokens_in_other_containers_give_the_same_results():
    """torch tensors, read-only arrays, float16 and images already at the target size are accepted."""
    import torch

    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    expected, mask = P.preprocess_image(image)
    from_tensor, tensor_mask = P.preprocess_image(torch.from_numpy(image))
    np.testing.assert_array_equal(from_tensor, expected)
    np.testing.assert_array_equal(tensor_mask, mask)
    as_float = (image / 255.0).astype(np.float32)
    read_only = as_float.copy()
    read_only.flags.writeable = False
    np.testing.assert_array_equal(P.resize_image(read_only, (60, 80)), P.resize_image(as_float, (60, 80)))
    half = P.resize_image(as_float.astype(np.float16), (60, 80))
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, P.resize_image(as_float, (60, 80)), atol=1e-3)
    np.testing.assert_array_equal(P.resize_image(image, (30, 40)), as_float)  # nothing to resize
    tokens = [P.location_token_id(q) for q in (100, 200, 300, 400)] + [7, 1]
    boxes = P.tokens_to_regions(tokens, (1000, 1000))
    np.testing.assert_equal(P.tokens_to_regions(torch.tensor(tokens), (1000, 1000)), boxes)

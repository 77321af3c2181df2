"""Reading, validating and writing checkpoints; every released size's tree is accepted."""
from __future__ import annotations

import json
import shutil
import weakref
from typing import Mapping

import numpy as np
import pytest
import torch

from uio import checkpoint
from uio.checkpoint import CheckpointError
from uio.config import CONFIGS, VAE_CONFIG, load_config
from uio.model.transformer import UnifiedIO


def meta_model(config, vae_config) -> UnifiedIO:
    with torch.device("meta"):
        return UnifiedIO(config, vae_config)


@pytest.mark.parametrize("size", ["small", "base", "large", "xl"])
def test_manifest_tree_matches_model(conformance, size):
    """Our model, built from our own config for ``size`` without allocating, expects exactly the
    manifest's paths, shapes and dtypes, and the manifest's config equals ours."""
    manifest = json.loads((conformance / "manifests" / f"{size}.json").read_text())
    config, vae_config = load_config(conformance / "manifests" / f"{size}.json")
    assert config == CONFIGS[size] and vae_config == VAE_CONFIG
    expected = checkpoint.expected_params(meta_model(config, vae_config))
    tree = {p["path"]: (tuple(p["shape"]), p["dtype"]) for p in manifest["params"]}
    assert expected == tree
    checkpoint.validate(tree, expected, f"{size}.json")
    assert sum(int(np.prod(s)) for s, _ in tree.values()) == manifest["total_params"]


@pytest.fixture()
def tiny_params(conformance):
    return checkpoint.read_bin(conformance / "tiny" / "tiny.bin")


@pytest.fixture()
def tiny_spec(conformance):
    return checkpoint.expected_params(meta_model(*load_config(conformance / "tiny" / "config.json")))


def test_tiny_reads_and_round_trips(conformance, tiny_params, tiny_spec, tmp_path):
    checkpoint.validate(tiny_params, tiny_spec, "tiny.bin")
    assert len(tiny_params) == 308
    out = tmp_path / "copy.bin"
    checkpoint.write_bin(tiny_params, out)
    assert out.read_bytes() == (conformance / "tiny" / "tiny.bin").read_bytes()


class _LazyLeaves(Mapping):
    """Arrays made on access, as a random-checkpoint writer would pass them; records the peak
    number of its arrays alive at once. ``fail_at``: the index of a leaf whose access raises."""

    def __init__(self, count: int, shape: tuple[int, ...], fail_at: int | None = None):
        self.keys_ = [f"layers_{i}/mlp/kernel" for i in range(count)]
        self.shape, self.fail_at = shape, fail_at
        self.alive = self.peak_alive = 0

    def __getitem__(self, key):
        if self.keys_.index(key) == self.fail_at:
            raise RuntimeError("cannot make this leaf")
        array = np.full(self.shape, self.keys_.index(key), np.float32)
        self.alive += 1
        self.peak_alive = max(self.peak_alive, self.alive)
        weakref.finalize(array, self._freed)
        return array

    def _freed(self):
        self.alive -= 1

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self):
        return len(self.keys_)


def test_write_bin_makes_one_leaf_at_a_time(tmp_path):
    leaves = _LazyLeaves(12, (64, 32))
    checkpoint.write_bin(leaves, tmp_path / "lazy.bin")
    assert leaves.peak_alive == 1
    back = checkpoint.read_bin(tmp_path / "lazy.bin")
    assert sorted(back) == sorted(leaves)
    for key in leaves:
        np.testing.assert_array_equal(back[key], np.full((64, 32), leaves.keys_.index(key), np.float32))


def test_failed_write_bin_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError, match="cannot make this leaf"):
        checkpoint.write_bin(_LazyLeaves(6, (4, 4), fail_at=3), tmp_path / "broken.bin")
    assert list(tmp_path.iterdir()) == []


def test_leaves_are_views_of_the_file(tiny_params):
    leaf = tiny_params["token_embedder/embedding"]
    assert not leaf.flags.owndata and not leaf.flags.writeable


@pytest.mark.parametrize("cut", [1, 1000, 5_000_000, -1])
def test_truncated_file_is_rejected(conformance, tmp_path, cut):
    data = (conformance / "tiny" / "tiny.bin").read_bytes()
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="truncated.bin"):
        checkpoint.read_bin(bad)


def test_garbage_and_empty_files_are_rejected(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"<html>not found</html>")
    with pytest.raises(CheckpointError, match="junk.bin"):
        checkpoint.read_bin(junk)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        checkpoint.read_bin(empty)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.read_bin(tmp_path / "missing.bin")


@pytest.mark.parametrize("leaf, reason", [
    ([[2], "float99", b"\0" * 8], "unknown dtype 'float99'"),
    ([[3], "float32", b"\0" * 8], "holds 8 bytes, which does not fit shape \\(3,\\)"),
    ([[2], "float32"], "not a \\(shape, dtype, data\\) triple"),
])
def test_malformed_leaves_are_named_with_the_reason(tmp_path, leaf, reason):
    import msgpack

    bad = tmp_path / "leaf.bin"
    bad.write_bytes(msgpack.packb({"decoder": {"scale": msgpack.ExtType(checkpoint.NDARRAY_EXT, msgpack.packb(leaf))}}))
    with pytest.raises(CheckpointError, match=f"leaf.bin: leaf 'decoder/scale' .*{reason}"):
        checkpoint.read_bin(bad)


def test_trailing_bytes_are_rejected(conformance, tmp_path):
    bad = tmp_path / "trailing.bin"
    shutil.copy(conformance / "tiny" / "tiny.bin", bad)
    with open(bad, "ab") as f:
        f.write(b"\x00")
    with pytest.raises(CheckpointError, match="unexpected bytes"):
        checkpoint.read_bin(bad)


def test_missing_extra_and_misshaped_leaves_are_named(tiny_params, tiny_spec):
    params = dict(tiny_params)
    del params["encoder/layers_1/mlp/wo/kernel"]
    with pytest.raises(CheckpointError, match="missing parameter 'encoder/layers_1/mlp/wo/kernel'"):
        checkpoint.validate(params, tiny_spec, "x.bin")
    params = dict(tiny_params, **{"encoder/extra/kernel": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match="unexpected parameter 'encoder/extra/kernel'"):
        checkpoint.validate(params, tiny_spec, "x.bin")
    params = dict(tiny_params, **{"decoder/pre_ln/scale": np.zeros(65, np.float32)})
    with pytest.raises(CheckpointError, match=r"'decoder/pre_ln/scale' has shape \(65,\), expected \(64,\)"):
        checkpoint.validate(params, tiny_spec, "x.bin")
    params = dict(tiny_params, **{"decoder/pre_ln/scale": np.zeros(64, np.int32)})
    with pytest.raises(CheckpointError, match="dtype int32"):
        checkpoint.validate(params, tiny_spec, "x.bin")


def test_wrong_size_checkpoint_names_the_first_bad_path(conformance, tmp_path):
    from uio.runner import build_model

    with pytest.raises(CheckpointError, match=r"tiny.bin: parameter 'decoder/cross_position_k_linear/kernel' "
                                              r"has shape \(64, 96\), expected \(512, 384\)"):
        build_model("small", conformance / "tiny" / "tiny.bin")


def test_torch_key_mapping_round_trips(tiny_spec):
    for path, (shape, _) in tiny_spec.items():
        leaf = path.rsplit("/", 1)[1]
        assert checkpoint.flax_path(checkpoint.torch_key(path), leaf) == path


def test_loaded_weights_equal_the_file(tiny_model, tiny_params):
    state = tiny_model.state_dict()
    for path, array in tiny_params.items():
        expected = torch.from_numpy(np.array(checkpoint.to_torch_layout(path, array)))
        assert torch.equal(state[checkpoint.torch_key(path)], expected), path


def test_loading_fills_the_fused_matrices_in_place(conformance, tiny_params):
    """Fused matrices allocated before loading receive their projections' weights where they are:
    no weight is allocated twice."""
    from uio.accel.layout import LaidOutPlacement, adjacent_rows, lay_out

    model = meta_model(*load_config(conformance / "tiny" / "config.json"))
    lay_out(model, "cpu", torch.float32)
    attention, mlp = model.decoder.layers[0].self_attention, model.encoder.layers[1].mlp
    qkv = lambda: adjacent_rows([attention.query.weight, attention.key.weight, attention.value.weight])  # noqa: E731
    wi = lambda: adjacent_rows([mlp.wi_0.weight, mlp.wi_1.weight])  # noqa: E731
    fused_qkv, fused_wi = qkv(), wi()
    checkpoint.load_into(model, tiny_params, "tiny.bin", placement=LaidOutPlacement())
    assert qkv().data_ptr() == fused_qkv.data_ptr() and wi().data_ptr() == fused_wi.data_ptr()
    for module, fused in ((attention.query, fused_qkv), (attention.value, fused_qkv), (mlp.wi_1, fused_wi)):
        assert module.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    prefix = "decoder/layers_0/self_attention"
    expected = np.concatenate([tiny_params[f"{prefix}/{name}/kernel"] for name in ("query", "key", "value")], axis=1)
    assert torch.equal(fused_qkv, torch.from_numpy(expected).T)
    assert torch.equal(mlp.wi_1.weight, torch.from_numpy(np.array(tiny_params["encoder/layers_1/mlp/wi_1/kernel"])).T)


def test_loading_into_a_matrix_allocated_for_another_dtype_is_refused(conformance, tiny_params):
    from uio.accel.layout import lay_out

    model = meta_model(*load_config(conformance / "tiny" / "config.json"))
    lay_out(model, "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match=r"parameter for '\w+/layers_\d+/\w+/(query|key|value|wi_0|wi_1)/kernel' "
                                         r"was allocated as torch.bfloat16 on cpu, but loading was asked for "
                                         r"torch.float32 on cpu"):
        checkpoint.load_into(model, tiny_params, "tiny.bin", dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_weights_keep_the_checkpoint_layout_in_fp32_only(conformance, tiny_params, dtype):
    """fp32 weights are views of the (in, out) kernels as stored (a plain copy to load), except the
    decoder's where uio's CPU kernels serve its steps (they stream (out, in) rows faster); other
    dtypes get (out, in) copies, which some half-precision CPU kernels need to be fast."""
    from uio.accel import cpu_kernels
    from uio.runner import build_model

    model = build_model(conformance / "tiny" / "config.json", conformance / "tiny" / "tiny.bin", dtype=dtype)
    state = model.state_dict()
    # a key or value is a third of its attention's fused (in, 3 * out) matrix
    for path in ("encoder/layers_0/attention/key/kernel", "decoder/layers_1/mlp/wo/kernel",
                 "decoder/layers_0/self_attention/value/kernel"):
        weight = state[checkpoint.torch_key(path)]
        out_features, in_features = weight.shape
        if dtype == torch.float32 and not (path.startswith("decoder/") and cpu_kernels.in_use(dtype)):
            assert weight.stride() == (1, out_features * (3 if "attention/" in path else 1)), path
        else:
            assert weight.stride() == (in_features, 1), path
        assert torch.equal(weight, torch.from_numpy(np.array(tiny_params[path])).T.to(dtype)), path


def test_safetensors_checkpoint_loads_the_same(tiny_model, tiny_params, tmp_path, conformance):
    from safetensors.torch import save_file

    from uio.runner import build_model

    path = tmp_path / "tiny.safetensors"
    save_file({k: torch.from_numpy(np.array(v)) for k, v in tiny_params.items()}, str(path))
    model = build_model(conformance / "tiny" / "config.json", path)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10" * 64)
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        build_model(conformance / "tiny" / "config.json", corrupt)


def _write_safetensors_by_hand(path, header, data: bytes = b"") -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def test_safetensors_leaves_are_read_only_views_of_the_file(tmp_path, tiny_params):
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    kernel = np.array(tiny_params["decoder/layers_0/mlp/wo/kernel"])
    half = torch.randn(3, 5).to(torch.bfloat16)
    save_file({"a/kernel": torch.from_numpy(kernel), "b/scale": half}, str(path), metadata={"format": "x"})
    leaves = checkpoint.SafetensorsLeaves(path)
    assert sorted(leaves) == ["a/kernel", "b/scale"] and leaves.metadata == {"format": "x"}
    leaf = leaves["a/kernel"]
    assert isinstance(leaf, np.ndarray) and not leaf.flags.owndata and not leaf.flags.writeable
    np.testing.assert_array_equal(leaf, kernel)
    assert leaves["b/scale"].dtype == torch.bfloat16 and torch.equal(leaves["b/scale"], half)
    leaves.release("a/kernel")  # its pages are dropped from memory; the data is re-read from the file
    np.testing.assert_array_equal(leaves["a/kernel"], kernel)


@pytest.mark.parametrize("header, data, reason", [
    (b"", b"", "header length 0"),
    (b"{not json", b"", "header is not JSON"),
    ([1, 2], b"", "header is not a JSON object"),
    ({"w": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), r"tensor 'w' has the entry"),
    ({"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), r"tensor 'w' has the entry"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), r"'w' has data_offsets \[0, 8\]"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4), r"'w' has data_offsets"),
])
def test_malformed_safetensors_files_are_rejected_with_the_reason(tmp_path, header, data, reason):
    path = tmp_path / "bad.safetensors"
    _write_safetensors_by_hand(path, header, data)
    with pytest.raises(CheckpointError, match=f"bad.safetensors: not a readable safetensors checkpoint .*{reason}"):
        checkpoint.SafetensorsLeaves(path)


def test_loading_from_safetensors_drops_each_leaf_from_memory_once_copied(conformance, tiny_params, tmp_path,
                                                                        monkeypatch):
    """As from a .bin: the file's pages are not held alongside the model (a large checkpoint's
    peak memory would otherwise grow by up to the file's size)."""
    from uio.runner import build_model

    path = tmp_path / "tiny.safetensors"
    checkpoint.write_safetensors(tiny_params, path)
    dropped = []
    monkeypatch.setattr(checkpoint, "_drop_pages", lambda buf, start, nbytes: dropped.append(nbytes))
    build_model(conformance / "tiny" / "config.json", path)
    assert sorted(dropped) == sorted(np.asarray(leaf).nbytes for leaf in tiny_params.values())


def test_params_from_model_inverts_loading(tiny_model, tiny_params):
    params = checkpoint.params_from_model(tiny_model)
    assert params.keys() == tiny_params.keys()
    for path, array in tiny_params.items():
        np.testing.assert_array_equal(params[path], array)


def test_released_leaves_stay_readable(conformance):
    """Loading drops each copied leaf's pages from memory; the data is re-read from the file."""
    params = checkpoint.read_bin(conformance / "tiny" / "tiny.bin")
    path = "token_embedder/embedding"
    before = np.array(params[path])
    params.release(path)
    np.testing.assert_array_equal(params[path], before)

"""uio.hub: checkpoint sizes, the resumable downloader and the cache, against a real local server."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from helpers_http import FileServer, closed_port_url
from uio import hub
from uio.checkpoint import read_bin, write_bin

FAST = {"progress": False, "timeout": 5.0, "retry_wait": 0.0}
_ENV = ("UIO_HOME", "XDG_CACHE_HOME", "UIO_OFFLINE", "HF_HUB_OFFLINE", "UIO_BASE_URL", "HF_ENDPOINT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No hub-related variable leaks in from the user's environment; the cache is under tmp."""
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UIO_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def ckpt_bytes(tmp_path_factory) -> bytes:
    """A random checkpoint in the released format (about 200 kB)."""
    rng = np.random.default_rng(0)
    params = {
        "encoder/layers_0/attention/query/kernel": rng.standard_normal((64, 96), dtype=np.float32),
        "encoder/layers_0/pre_attention_layer_norm/scale": rng.standard_normal(64, dtype=np.float32),
        "decoder/decoder_norm/scale": rng.standard_normal(64, dtype=np.float32),
        "token_embedder/embedding": rng.standard_normal((300, 64), dtype=np.float32),
        "discrete_vae/quant_conv/kernel": rng.standard_normal((1, 1, 16, 16), dtype=np.float32),
    }
    path = tmp_path_factory.mktemp("ckpt") / "x.bin"
    write_bin(params, path)
    return path.read_bytes()


def _register(monkeypatch, name: str, data: bytes) -> None:
    monkeypatch.setitem(hub.CHECKPOINTS, name, hub.RemoteFile(f"{name}_1000k.bin", len(data)))


# ------------------------------------------------------------------ sizes

def test_tree_size_matches_write_bin(tmp_path):
    rng = np.random.default_rng(1)
    leaves = {f"a/m{i}/{'k' * (i * 3)}x": np.zeros((int(rng.integers(1, 300)),) + (2,) * (i % 4),
                                                   dtype=["float32", "float16", "int8", "float64"][i % 4])
              for i in range(40)}  # long keys (str8), maps over 15 entries (map16), uint16 dims
    leaves["big/kernel"] = np.zeros((70_000,), np.float32)  # bin32 / ext32
    write_bin(leaves, tmp_path / "t.bin")
    assert hub.msgpack_tree_size(leaves) == (tmp_path / "t.bin").stat().st_size
    shapes = {k: (v.shape, v.dtype.name) for k, v in leaves.items()}
    assert hub.msgpack_tree_size(shapes) == (tmp_path / "t.bin").stat().st_size


def test_tree_size_on_tiny_oracle(conformance):
    file_bytes = json.loads((conformance / "tiny" / "config.json").read_text())["file_bytes"]
    params = read_bin(conformance / "tiny" / "tiny.bin")
    assert (conformance / "tiny" / "tiny.bin").stat().st_size == file_bytes
    assert hub.msgpack_tree_size({k: (v.shape, v.dtype.name) for k, v in params.items()}) == file_bytes


@pytest.mark.parametrize("size", ["small", "base", "large", "xl"])
def test_checkpoint_sizes_match_manifests(conformance, size):
    manifest = json.loads((conformance / "manifests" / f"{size}.json").read_text())
    leaves = {p["path"]: (tuple(p["shape"]), p["dtype"]) for p in manifest["params"]}
    assert hub.msgpack_tree_size(leaves) == hub.CHECKPOINT_BYTES[size] == hub.CHECKPOINTS[size].size


def test_checkpoint_urls(monkeypatch):
    assert hub.checkpoint_url("base") == (
        "https://ai2-prior-uio.s3.us-west-2.amazonaws.com/public/model-weights-bin/base_1000k.bin")
    monkeypatch.setenv("UIO_BASE_URL", "http://mirror.local/w/")
    assert hub.checkpoint_url("xl") == "http://mirror.local/w/xl_1000k.bin"
    assert hub.tokenizer_url() == "https://huggingface.co/t5-base/resolve/main/spiece.model"
    monkeypatch.setenv("HF_ENDPOINT", "http://hf.local")
    assert hub.tokenizer_url() == "http://hf.local/t5-base/resolve/main/spiece.model"
    with pytest.raises(ValueError, match="unknown checkpoint size 'huge'"):
        hub.checkpoint_url("huge")


# ------------------------------------------------------------------ download()

def test_download_checkpoint_file(tmp_path, ckpt_bytes):
    dest = tmp_path / "out" / "x.bin"
    with FileServer({"/x.bin": ckpt_bytes}) as server:
        assert hub.download(server.url("/x.bin"), dest, len(ckpt_bytes), **FAST) == dest
    assert dest.read_bytes() == ckpt_bytes
    assert not (tmp_path / "out" / "x.bin.partial").exists()
    assert len(read_bin(dest)) == 5
    assert server.requests == [("/x.bin", None, 200)]


def test_download_shows_progress(tmp_path, ckpt_bytes, capsys):
    with FileServer({"/x.bin": ckpt_bytes}) as server:
        hub.download(server.url("/x.bin"), tmp_path / "x.bin", len(ckpt_bytes), progress=True, timeout=5.0)
    assert "x.bin" in capsys.readouterr().err


def test_resume_after_dropped_connection(tmp_path, ckpt_bytes):
    dest = tmp_path / "x.bin"
    with FileServer({"/x.bin": ckpt_bytes}, drop_after=50_000) as server:
        hub.download(server.url("/x.bin"), dest, len(ckpt_bytes), **FAST)
    assert dest.read_bytes() == ckpt_bytes
    assert server.requests == [("/x.bin", None, 200), ("/x.bin", "bytes=50000-", 206)]


def test_resume_after_two_drops_without_expected_size(tmp_path, ckpt_bytes):
    dest = tmp_path / "x.bin"
    with FileServer({"/x.bin": ckpt_bytes}, drop_after=30_000, drops=2) as server:
        hub.download(server.url("/x.bin"), dest, **FAST)
    assert dest.read_bytes() == ckpt_bytes
    assert [r[1] for r in server.requests] == [None, "bytes=30000-", "bytes=60000-"]


def test_stalled_connection_times_out_and_resumes(tmp_path, ckpt_bytes):
    dest = tmp_path / "x.bin"
    with FileServer({"/x.bin": ckpt_bytes}, drop_after=40_000, stall=2.0) as server:
        hub.download(server.url("/x.bin"), dest, len(ckpt_bytes), progress=False, timeout=0.3, retry_wait=0)
    assert dest.read_bytes() == ckpt_bytes
    assert [r[1] for r in server.requests] == [None, "bytes=40000-"]


def test_file_url(tmp_path, ckpt_bytes):
    (tmp_path / "src.bin").write_bytes(ckpt_bytes)
    hub.download((tmp_path / "src.bin").as_uri(), tmp_path / "x.bin", len(ckpt_bytes), **FAST)
    assert (tmp_path / "x.bin").read_bytes() == ckpt_bytes


def test_server_ignoring_range_restarts(tmp_path, ckpt_bytes):
    dest = tmp_path / "x.bin"
    with FileServer({"/x.bin": ckpt_bytes}, drop_after=50_000, honour_range=False) as server:
        hub.download(server.url("/x.bin"), dest, len(ckpt_bytes), **FAST)
    assert dest.read_bytes() == ckpt_bytes
    assert server.requests == [("/x.bin", None, 200), ("/x.bin", "bytes=50000-", 200)]


def test_existing_partial_is_resumed(tmp_path, ckpt_bytes):
    dest = tmp_path / "x.bin"
    (tmp_path / "x.bin.partial").write_bytes(ckpt_bytes[:12_345])
    with FileServer({"/x.bin": ckpt_bytes}) as server:
        hub.download(server.url("/x.bin"), dest, len(ckpt_bytes), **FAST)
    assert dest.read_bytes() == ckpt_bytes
    assert server.requests == [("/x.bin", "bytes=12345-", 206)]


def test_complete_partial_needs_no_request(tmp_path, ckpt_bytes):
    (tmp_path / "x.bin.partial").write_bytes(ckpt_bytes)
    hub.download(closed_port_url("/x.bin"), tmp_path / "x.bin", len(ckpt_bytes), **FAST)
    assert (tmp_path / "x.bin").read_bytes() == ckpt_bytes


def test_416_on_complete_partial_finishes(tmp_path, ckpt_bytes):
    (tmp_path / "x.bin.partial").write_bytes(ckpt_bytes)
    with FileServer({"/x.bin": ckpt_bytes}) as server:
        hub.download(server.url("/x.bin"), tmp_path / "x.bin", **FAST)
    assert (tmp_path / "x.bin").read_bytes() == ckpt_bytes
    assert [r[2] for r in server.requests] == [416]


def test_416_on_overlong_partial_restarts(tmp_path, ckpt_bytes):
    (tmp_path / "x.bin.partial").write_bytes(ckpt_bytes + b"junk")
    with FileServer({"/x.bin": ckpt_bytes}) as server:
        hub.download(server.url("/x.bin"), tmp_path / "x.bin", **FAST)
    assert (tmp_path / "x.bin").read_bytes() == ckpt_bytes
    assert [r[2] for r in server.requests] == [416, 200]


def test_overlong_partial_of_known_size_restarts_without_asking(tmp_path, ckpt_bytes):
    (tmp_path / "x.bin.partial").write_bytes(ckpt_bytes + b"junk")
    with FileServer({"/x.bin": ckpt_bytes}) as server:
        hub.download(server.url("/x.bin"), tmp_path / "x.bin", len(ckpt_bytes), **FAST)
    assert (tmp_path / "x.bin").read_bytes() == ckpt_bytes
    assert server.requests == [("/x.bin", None, 200)]


def test_short_file_is_an_error_and_leaves_nothing(tmp_path, ckpt_bytes):
    dest = tmp_path / "x.bin"
    with FileServer({"/x.bin": ckpt_bytes[:-100]}) as server:
        with pytest.raises(hub.DownloadError, match=rf"{len(ckpt_bytes) - 100} bytes but {len(ckpt_bytes)}"):
            hub.download(server.url("/x.bin"), dest, len(ckpt_bytes), **FAST)
    assert list(tmp_path.iterdir()) == []


def test_short_file_without_content_length(tmp_path, ckpt_bytes):
    dest = tmp_path / "x.bin"
    with FileServer({"/x.bin": ckpt_bytes[:-100]}, send_length=False) as server:
        with pytest.raises(hub.DownloadError, match=rf"is {len(ckpt_bytes) - 100} bytes, expected"):
            hub.download(server.url("/x.bin"), dest, len(ckpt_bytes), **FAST)
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_is_an_error(tmp_path, ckpt_bytes):
    with FileServer({"/x.bin": ckpt_bytes}) as server:
        with pytest.raises(hub.DownloadError, match="SHA-256"):
            hub.download(server.url("/x.bin"), tmp_path / "x.bin", sha256="0" * 64, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_retries_are_bounded_and_keep_the_partial(tmp_path, ckpt_bytes):
    dest = tmp_path / "x.bin"
    with FileServer({"/x.bin": ckpt_bytes}, drop_after=1000, drops=100) as server:
        with pytest.raises(hub.DownloadError, match="failed after 3 attempts"):
            hub.download(server.url("/x.bin"), dest, len(ckpt_bytes), retries=2, **FAST)
    assert len(server.requests) == 3
    assert not dest.exists()
    assert (tmp_path / "x.bin.partial").stat().st_size == 3000  # resumable next time


def test_server_errors_are_retried(tmp_path, ckpt_bytes):
    with FileServer({"/x.bin": ckpt_bytes}, fail_first=2) as server:
        hub.download(server.url("/x.bin"), tmp_path / "x.bin", len(ckpt_bytes), **FAST)
    assert [r[2] for r in server.requests] == [503, 503, 200]


def test_not_found_fails_fast(tmp_path):
    with FileServer({}) as server:
        with pytest.raises(hub.DownloadError, match="HTTP 404"):
            hub.download(server.url("/nope.bin"), tmp_path / "x.bin", **FAST)
    assert len(server.requests) == 1
    assert not (tmp_path / "x.bin").exists()


def test_unreachable_server_is_offline_error(tmp_path):
    with pytest.raises(hub.OfflineError, match="cannot reach"):
        hub.download(closed_port_url("/x.bin"), tmp_path / "x.bin", **FAST)


# ------------------------------------------------------------------ cache

def test_cache_dir_env(monkeypatch, tmp_path):
    assert hub.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("UIO_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "unified-io"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "unified-io"


def test_checkpoint_path_downloads_once(monkeypatch, tmp_path, ckpt_bytes):
    _register(monkeypatch, "test", ckpt_bytes)
    with FileServer({"/w/test_1000k.bin": ckpt_bytes}) as server:
        monkeypatch.setenv("UIO_BASE_URL", server.url("/w"))
        path = hub.checkpoint_path("test")
        assert hub.checkpoint_path("test") == path == tmp_path / "cache" / "test_1000k.bin"
    assert len(server.requests) == 1
    assert path.read_bytes() == ckpt_bytes


def test_checkpoint_path_prefers_safetensors(monkeypatch, tmp_path):
    monkeypatch.setenv("UIO_OFFLINE", "1")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "base.safetensors").write_bytes(b"x")
    assert hub.checkpoint_path("base") == cache / "base.safetensors"


def test_checkpoint_path_uses_cached_bin(monkeypatch, tmp_path, ckpt_bytes):
    _register(monkeypatch, "test", ckpt_bytes)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "test_1000k.bin").write_bytes(ckpt_bytes)
    assert hub.checkpoint_path("test") == tmp_path / "cache" / "test_1000k.bin"


def test_cached_file_of_wrong_size_is_reported(monkeypatch, tmp_path, ckpt_bytes):
    _register(monkeypatch, "test", ckpt_bytes)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "test_1000k.bin").write_bytes(ckpt_bytes[:10])
    with pytest.raises(hub.DownloadError, match="delete it"):
        hub.checkpoint_path("test")


@pytest.mark.parametrize("var", ["UIO_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_message_says_what_to_download_and_where(monkeypatch, tmp_path, var):
    monkeypatch.setenv(var, "1")
    with pytest.raises(hub.OfflineError) as info:
        hub.checkpoint_path("large")
    message = str(info.value)
    assert "https://ai2-prior-uio.s3.us-west-2.amazonaws.com/public/model-weights-bin/large_1000k.bin" in message
    assert str(tmp_path / "cache" / "large_1000k.bin") in message
    assert "3,410,526,957 bytes" in message and "UIO_OFFLINE" in message
    assert not (tmp_path / "cache" / "large_1000k.bin").exists()


def test_download_false_message(tmp_path):
    with pytest.raises(hub.OfflineError, match="download=False"):
        hub.checkpoint_path("small", download=False)


def test_connection_error_message(monkeypatch, tmp_path):
    monkeypatch.setenv("UIO_BASE_URL", closed_port_url("/w").rstrip("/"))
    with pytest.raises(hub.OfflineError) as info:
        hub.checkpoint_path("small")
    message = str(info.value)
    assert "the download failed" in message and "cannot reach" in message and "/w/small_1000k.bin" in message
    assert str(tmp_path / "cache" / "small_1000k.bin") in message


# ------------------------------------------------------------------ tokenizer

@pytest.fixture
def fake_vocab(monkeypatch) -> bytes:
    data = os.urandom(5000)
    monkeypatch.setattr(hub, "TOKENIZER", hub.RemoteFile("spiece.model", len(data),
                                                         hashlib.sha256(data).hexdigest()))
    return data


def test_tokenizer_path_downloads_through_redirect(monkeypatch, tmp_path, fake_vocab):
    files = {"/cdn/spiece.model": fake_vocab}
    redirects = {"/t5-base/resolve/main/spiece.model": "/cdn/spiece.model"}
    with FileServer(files, redirects=redirects) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.base_url)
        path = hub.tokenizer_path()
        assert hub.tokenizer_path() == path == tmp_path / "cache" / "t5-base" / "spiece.model"
    assert path.read_bytes() == fake_vocab
    assert [r[2] for r in server.requests] == [302, 200]


def test_tokenizer_checksum_is_verified(monkeypatch, tmp_path, fake_vocab):
    with FileServer({"/t5-base/resolve/main/spiece.model": fake_vocab[::-1]}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.base_url)
        with pytest.raises(hub.DownloadError, match="SHA-256"):
            hub.tokenizer_path()
    assert not (tmp_path / "cache" / "t5-base" / "spiece.model").exists()


def test_http_error_message_says_where_to_put_the_file(monkeypatch, tmp_path):
    with FileServer({}) as server:
        monkeypatch.setenv("UIO_BASE_URL", server.url("/w"))
        with pytest.raises(hub.DownloadError, match="HTTP 404") as info:
            hub.checkpoint_path("base")
    assert str(tmp_path / "cache" / "base_1000k.bin") in str(info.value)


def test_tokenizer_offline_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.OfflineError) as info:
        hub.tokenizer_path()
    assert "https://huggingface.co/t5-base/resolve/main/spiece.model" in str(info.value)
    assert str(tmp_path / "cache" / "t5-base" / "spiece.model") in str(info.value)


def test_real_tokenizer_pin():
    assert hub.TOKENIZER == hub.RemoteFile(
        "spiece.model", 791_656, "d60acb128cf7b7f2536e8f38a5b18a05535c9e14c7a355904270e15b0945ea86")


# ------------------------------------------------------------------ damaged files (issue 28, item 8)

def test_resumed_partial_that_cannot_be_valid_is_downloaded_again(monkeypatch, tmp_path, ckpt_bytes):
    _register(monkeypatch, "test", ckpt_bytes)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "test_1000k.bin.partial").write_bytes(bytes(len(ckpt_bytes)))  # zeros, as after a crash
    with FileServer({"/w/test_1000k.bin": ckpt_bytes}) as server:
        monkeypatch.setenv("UIO_BASE_URL", server.url("/w"))
        path = hub.checkpoint_path("test")
    assert path.read_bytes() == ckpt_bytes
    assert len(server.requests) == 1 and not (tmp_path / "cache" / "test_1000k.bin.partial").exists()


def test_resumed_partial_that_cannot_be_valid_is_never_promoted(monkeypatch, tmp_path, ckpt_bytes):
    _register(monkeypatch, "test", ckpt_bytes)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "test_1000k.bin.partial").write_bytes(ckpt_bytes[:1000] + bytes(len(ckpt_bytes) - 1000))
    monkeypatch.setenv("UIO_BASE_URL", closed_port_url("/w").rstrip("/"))
    with pytest.raises(hub.OfflineError, match="cannot reach"):
        hub.checkpoint_path("test")
    assert list(cache.iterdir()) == []


def test_downloaded_checkpoint_that_is_not_one_is_refused(monkeypatch, tmp_path, ckpt_bytes):
    _register(monkeypatch, "test", ckpt_bytes)
    server = FileServer({"/w/test_1000k.bin": bytes(len(ckpt_bytes))})
    with server, pytest.raises(hub.DownloadError, match=r"is not a valid file \(.*expected a map at '<root>'"):
        monkeypatch.setenv("UIO_BASE_URL", server.url("/w"))
        hub.checkpoint_path("test")
    assert not (tmp_path / "cache" / "test_1000k.bin").exists()


def test_damaged_cached_checkpoint_says_to_delete_it(monkeypatch, tmp_path, conformance):
    from uio.checkpoint import CheckpointError
    from uio.runner import ModelRunner

    damaged = tmp_path / "cache" / "small_1000k.bin"
    damaged.parent.mkdir()
    damaged.write_bytes(bytes(1000))
    monkeypatch.setattr(hub, "checkpoint_path", lambda size, download=True: damaged)
    with pytest.raises(CheckpointError, match="delete it and run again to download it again") as info:
        ModelRunner.from_pretrained(str(conformance / "tiny" / "config.json"),
                                    tokenizer=conformance / "tokenizer" / "spiece.model")
    assert f"the cached file {damaged} is damaged" in str(info.value)


def test_damaged_cached_vocabulary_says_to_delete_it(monkeypatch, tmp_path):
    from uio.tokenizer import load_tokenizer

    data = os.urandom(5000)
    monkeypatch.setattr(hub, "TOKENIZER", hub.RemoteFile("spiece.model", len(data)))
    cached = tmp_path / "cache" / "t5-base" / "spiece.model"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data)
    with pytest.raises(ValueError, match=f"the cached file {cached} is damaged or incomplete: delete it"):
        load_tokenizer()


def test_missing_vocabulary_names_its_real_place_and_the_options(monkeypatch):
    monkeypatch.setenv("UIO_OFFLINE", "1")
    with pytest.raises(hub.OfflineError) as info:
        hub.tokenizer_path()
    message = str(info.value)
    assert "$UIO_HOME/t5-base/spiece.model" in message
    assert "--tokenizer PATH" in message and "tokenizer=PATH" in message
    with pytest.raises(hub.OfflineError, match=r"\$UIO_HOME/small_1000k\.bin\)(.|\n)*--weights PATH"):
        hub.checkpoint_path("small")

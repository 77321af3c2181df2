"""From an empty cache to an answer through the real download path.

A random checkpoint in the released format (tiny sizes, generated here) and the vocabulary are
served by a real HTTP server on 127.0.0.1 that drops the first connection mid-file; `uio demo`
and `ModelRunner.from_pretrained` must download (resuming), cache, and answer.
"""
from __future__ import annotations

import hashlib

import pytest
import torch

from helpers_http import FileServer
from uio import checkpoint, cli, config, hub
from uio.model.transformer import UnifiedIO

SIZE = "e2e"


@pytest.fixture()
def served_model(conformance, tmp_path, monkeypatch):
    """Register size ``e2e`` (tiny config, random weights) and serve its files; yields the server."""
    model_config, vae_config = config.load_config(conformance / "tiny" / "config.json")
    torch.manual_seed(0)
    model = UnifiedIO(model_config, vae_config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.05)
    weights = tmp_path / "source.bin"
    checkpoint.write_bin(checkpoint.params_from_model(model), weights)
    data = weights.read_bytes()
    vocab = (conformance / "tokenizer" / "spiece.model").read_bytes()

    monkeypatch.setitem(config.CONFIGS, SIZE, model_config)
    monkeypatch.setattr(config, "VAE_CONFIG", vae_config)
    monkeypatch.setattr(cli, "MODEL_SIZES", (*cli.MODEL_SIZES, SIZE))
    monkeypatch.setitem(hub.CHECKPOINTS, SIZE, hub.RemoteFile(f"{SIZE}_1000k.bin", len(data)))
    monkeypatch.setattr(hub, "TOKENIZER", hub.RemoteFile("spiece.model", len(vocab),
                                                         hashlib.sha256(vocab).hexdigest()))
    for name in ("UIO_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UIO_HOME", str(tmp_path / "cache"))
    files = {f"/weights/{SIZE}_1000k.bin": data, "/t5-base/resolve/main/spiece.model": vocab}
    with FileServer(files, drop_after=len(data) // 3) as server:
        monkeypatch.setenv("UIO_BASE_URL", server.url("/weights"))
        monkeypatch.setenv("HF_ENDPOINT", server.base_url)
        yield server, data


def test_demo_downloads_resumes_caches_and_answers(served_model, tmp_path, capsys):
    server, data = served_model
    assert cli.main(["demo", "--model", SIZE]) == 0
    out = capsys.readouterr().out
    assert "What color is the sofa?" in out and "A:" in out
    cached = tmp_path / "cache" / f"{SIZE}_1000k.bin"
    assert cached.read_bytes() == data
    weight_requests = [r for r in server.requests if r[0].endswith(".bin")]
    assert [status for _, _, status in weight_requests] == [200, 206], "dropped once, then resumed"
    assert weight_requests[1][1] == f"bytes={len(data) // 3}-"

    # Everything is cached now: a second run makes no request, and the API gives the same answer.
    count = len(server.requests)
    assert cli.main(["demo", "--model", SIZE, "--json"]) == 0
    assert len(server.requests) == count
    runner = cli.load_runner(cli.build_parser().parse_args(["demo", "--model", SIZE]))
    assert runner.vqa(cli.demo_image(), cli.DEMO_QUESTION)["text"] in out


def test_offline_with_empty_cache_says_what_to_fetch(served_model, monkeypatch, capsys):
    monkeypatch.setenv("UIO_OFFLINE", "1")
    assert cli.main(["demo", "--model", SIZE]) == 1
    err = capsys.readouterr().err
    assert f"{SIZE}_1000k.bin" in err and "place it at" in err

"""The ``uio`` command line, run in-process on the tiny checkpoint (one subprocess for the entry point)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uio import checkpoint, cli, draw
from uio.accel import cpu_kernels
from uio.runner import ModelRunner
from uio.tasks import TASKS


@pytest.fixture()
def preloaded(monkeypatch, tiny_runner) -> None:
    """Commands get the module's tiny runner instead of loading the checkpoint again (after the
    same option checks); tests of loading itself (vqa, demo, convert) do not use this."""
    monkeypatch.setattr(cli, "load_runner", lambda args: tiny_runner)


@pytest.fixture(scope="module")
def image_path(conformance) -> str:
    return str(conformance / "golden" / "test_image.png")  # 640x480


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``uio argv...`` in-process: (exit status, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv) -> dict:
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_vqa_prints_text_and_json(capsys, model_args, image_path):
    code, out, err = run_cli(capsys, "vqa", image_path, "What color is the sofa?", *model_args)
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1 and out.strip()
    record = run_json(capsys, "vqa", image_path, "What color is the sofa?", *model_args)
    assert record["command"] == "vqa" and record["text"] == out.strip()
    assert isinstance(record["score"], float)


def test_vqa_num_decodes_lists_best_first(capsys, preloaded, model_args, image_path):
    record = run_json(capsys, "vqa", image_path, "what is on the left ?", "--num-decodes", 2, *model_args)
    scores = [d["score"] for d in record["decodes"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True) and record["score"] == scores[0]


@pytest.mark.parametrize("command, extra, mode", [
    ("depth", [], "L"), ("segment", ["car"], "RGB"),
    ("inpaint", [100, 50, 300, 200, "a dog"], "RGB")])
def test_spatial_outputs_have_the_input_size(capsys, preloaded, tmp_path, model_args, image_path, command, extra, mode):
    out = tmp_path / "sub" / f"{command}.png"
    record = run_json(capsys, command, image_path, *extra, "-o", out, *model_args)
    assert record["output"] == str(out)
    with Image.open(out) as written:
        assert written.size == (640, 480) and written.mode == mode


def test_generate_writes_a_256_png(capsys, preloaded, tmp_path, model_args):
    code, out, err = run_cli(capsys, "generate", "a red bus", "-o", tmp_path / "bus.png", *model_args)
    assert code == 0, err
    assert "bus.png" in out
    with Image.open(tmp_path / "bus.png") as written:
        assert written.format == "PNG" and written.size == (256, 256)


def test_refexp_and_pose_with_the_tiny_model_write_images(capsys, preloaded, tmp_path, model_args, image_path):
    """Random weights give no well-formed boxes/joints: the input image is still written, nothing fails."""
    record = run_json(capsys, "refexp", image_path, "the red car", "-o", tmp_path / "r.png", *model_args)
    assert record["boxes"] == [] and (tmp_path / "r.png").is_file()
    record = run_json(capsys, "pose", image_path, 10, 10, 200, 300, "--beam-search", "-o", tmp_path / "p.png",
                      *model_args)
    assert record["keypoints"] == [] and record["invalid"] is True
    with Image.open(tmp_path / "p.png") as written:
        assert written.size == (640, 480)


def test_boxes_and_keypoints_are_drawn(capsys, preloaded, tmp_path, monkeypatch, model_args, image_path):
    """With well-formed predictions (stubbed), boxes and the skeleton are printed and drawn."""
    box = np.array([[100.0, 50.0, 300.0, 200.0]])
    points = np.stack([np.linspace(20, 180, 17), np.linspace(30, 280, 17)], axis=1)

    def fake_refexp(self, image, expression, num_decodes=None, beam_search=None):
        return {"boxes": box, "labels": [np.array(self.tokenizer.encode("car")[:-1])], "score": np.array([[-1.5]])}

    def fake_pose(self, image, location, num_decodes=None, beam_search=None):
        return {"points": points, "labels": np.full(17, 2), "invalid": False, "score": np.array([[-2.0]])}

    monkeypatch.setattr(ModelRunner, "refexp", fake_refexp)
    monkeypatch.setattr(ModelRunner, "pose", fake_pose)
    code, out, err = run_cli(capsys, "refexp", image_path, "the car", "-o", tmp_path / "b.png", *model_args)
    assert code == 0, err
    assert out.splitlines()[0].startswith("100.0 50.0 300.0 200.0") and "car" in out.splitlines()[0]
    original = np.array(Image.open(image_path).convert("RGB"))
    drawn = np.array(Image.open(tmp_path / "b.png"))
    assert drawn.shape == original.shape
    assert (drawn[50, 150:250] != original[50, 150:250]).any()  # the top edge of the box
    assert (drawn[120, 150:250] == original[120, 150:250]).all()  # inside, untouched
    record = run_json(capsys, "pose", image_path, 10, 10, 200, 300, "-o", tmp_path / "k.png", *model_args)
    assert [k["name"] for k in record["keypoints"]] == list(draw.COCO_KEYPOINTS)
    assert record["keypoints"][0] == {"name": "nose", "x": 20.0, "y": 30.0, "visibility": 2}
    drawn = np.array(Image.open(tmp_path / "k.png"))
    assert (drawn[30, 20] != original[30, 20]).any()


def test_classify_picks_one_of_the_options(capsys, preloaded, model_args, image_path):
    record = run_json(capsys, "classify", image_path, "--options", "cat, dog,bus", *model_args)
    assert record["text"] in ("cat", "dog", "bus")


def test_run_text_and_image_prompts(capsys, preloaded, tmp_path, model_args, image_path):
    record = run_json(capsys, "run", image_path, "What is this ?", "--text-len", 4, *model_args)
    assert isinstance(record["text"], str)
    record = run_json(capsys, "run", "-", 'What is the complete image? Text: " a bus " .', "--image-output",
                      "-o", tmp_path / "run.png", *model_args)
    with Image.open(record["output"]) as written:
        assert written.size == (256, 256)


def test_demo_answers_the_readme_question(capsys, model_args):
    code, out, err = run_cli(capsys, "demo", *model_args)
    assert code == 0, err
    assert out.startswith(f"Q: {cli.DEMO_QUESTION}\nA: ")
    record = run_json(capsys, "demo", *model_args)
    assert record["question"] == cli.DEMO_QUESTION and isinstance(record["text"], str)


def test_demo_image_is_small_and_bundled():
    image = cli.demo_image()
    assert image.shape == (384, 384, 3) and image.dtype == np.uint8
    red = (image[..., 0] > 150) & (image[..., 1] < 80) & (image[..., 2] < 80)
    assert red.mean() > 0.05  # the sofa


def test_demo_offline_with_an_empty_cache(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UIO_HOME", str(tmp_path))
    monkeypatch.setenv("UIO_OFFLINE", "1")
    code, out, err = run_cli(capsys, "demo")
    assert code == 1 and out == ""
    assert err.startswith("uio: error: ") and "not in the cache" in err and "small_1000k.bin" in err
    assert "Traceback" not in err


def test_convert_round_trip_and_bf16(capsys, tmp_path, conformance, model_args, image_path):
    src, config = conformance / "tiny" / "tiny.bin", conformance / "tiny" / "config.json"
    dst = tmp_path / "tiny.safetensors"
    code, out, err = run_cli(capsys, "convert", src, dst)
    assert code == 2 and "--model" in err and not dst.exists()  # tiny is none of the released sizes

    record = run_json(capsys, "convert", src, dst, "--model", config)
    assert record["tensors"] == 308 and record["destination_bytes"] == dst.stat().st_size
    original, converted = checkpoint.read_bin(src), checkpoint.load_checkpoint_file(dst)
    assert original.keys() == converted.keys()
    assert all(np.array_equal(original[k], converted[k]) for k in original)
    metadata = checkpoint.read_metadata(dst)
    assert metadata["format"] == "uio-flax-paths"
    assert json.loads(metadata["uio_config"]) == json.loads((tmp_path / "tiny.json").read_text())

    half = tmp_path / "half.safetensors"
    code, out, err = run_cli(capsys, "convert", src, half, "--model", config, "--dtype", "bf16")
    assert code == 0, err
    assert "converted" in out and "half.json" in out
    assert 0.45 < half.stat().st_size / dst.stat().st_size < 0.55
    assert {t.dtype for t in checkpoint.load_checkpoint_file(half).values()} == {torch.bfloat16}

    # A converted file finds its config by itself and answers exactly like the .bin.
    tokenizer = ["--tokenizer", model_args[model_args.index("--tokenizer") + 1]]
    from_bin = run_json(capsys, "vqa", image_path, "what is it?", *model_args)
    from_safetensors = run_json(capsys, "vqa", image_path, "what is it?", "--weights", dst, *tokenizer)
    assert from_safetensors["text"] == from_bin["text"]


@pytest.mark.parametrize("argv, message", [
    (["vqa", "missing.png", "q"], "missing.png: no such file"),
    (["vqa", "{bad}", "q"], "not a readable image"),
    (["region-caption", "{image}", "1", "2", "3"], "required: Y2"),
    (["region-caption", "{image}", "10", "10", "5", "20"], "box 10 10 5 20: need x1 < x2"),
    (["pose", "{image}", "10", "10", "900", "20"], "not inside the 640x480 image"),
    (["region-classify", "{image}", "1", "2", "x", "4"], "argument X2"),
    (["depth", "{image}", "-o", "depth.xyz"], "unknown image file extension"),
    (["vqa", "{image}", "q", "--model", "huge"], "--model huge"),
    (["vqa", "{image}", "q", "--weights", "missing.bin"], "--weights missing.bin: no such file"),
    (["classify", "{image}", "--options", "a,b", "--num-decodes", "2"], "cannot be combined"),
    (["seg-generate", "{image}", "--labels", "a", "b"], "1 masks but 2 labels"),
    (["convert", "missing.bin", "out.safetensors"], "no such file"),
    (["nonsense"], "invalid choice"),
    (["vqa", "{image}", "q", "--device", "tpu9"], "--device: unknown device 'tpu9'"),
    (["run", "{image}", "p", "--options", "a,b", "--image-output"], "cannot be combined with --image-output"),
    (["run", "{image}", "p", "--text-len", "1"], "leaves no room for text"),
    (["run", "{image}", "p", "--text-len", "0"], "expected a positive integer"),
    (["run", "{image}", "p", "--text-len", "500"], "must be at most 128"),
    (["convert", "{image}", "out.bin"], "must end in .safetensors"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, image_path, argv, message):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    code, out, err = run_cli(capsys, *(a.format(image=image_path, bad=bad) for a in argv))
    assert code == 2 and out == ""
    assert err.startswith("uio") and ": error: " in err and message in err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture()
def no_loading(monkeypatch):
    """Commands fail loudly if they get as far as loading the model."""
    def load(args):
        raise AssertionError("the model was loaded before the bad output path was refused")

    monkeypatch.setattr(cli, "load_runner", load)


@pytest.mark.parametrize("output, message", [
    ("{file}/d.png", "output file {file}/d.png: {file} is a file, not a folder"),
    ("{file}/sub/d.png", "{file} is a file, not a folder"),
    ("{folder}", "output file {folder}: is a folder; give a file name such as {folder}/out.png"),
    ("/proc/uio-output-test/d.png", "output file /proc/uio-output-test/d.png: cannot write there"),
])
def test_output_paths_are_checked_before_loading(capsys, tmp_path, no_loading, model_args, image_path, output,
                                                 message):
    if output.startswith("/proc") and not Path("/proc/self").exists():
        pytest.skip("needs Linux's read-only /proc")
    (tmp_path / "photo.png").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    names = {"file": tmp_path / "photo.png", "folder": tmp_path / "folder.png"}
    code, out, err = run_cli(capsys, "depth", image_path, "-o", output.format(**names), *model_args)
    assert code == 2 and out == ""
    assert message.format(**names) in err and len(err.strip().splitlines()) == 1


def test_default_and_numbered_outputs_are_checked_too(capsys, tmp_path, monkeypatch, no_loading, model_args,
                                                      image_path):
    (tmp_path / "d-2.png").mkdir()
    code, _, err = run_cli(capsys, "depth", image_path, "-o", tmp_path / "d.png", "--num-decodes", "2", *model_args)
    assert code == 2 and f"output file {tmp_path / 'd-2.png'}: is a folder" in err
    if Path("/proc/self").exists():
        monkeypatch.chdir("/proc")  # the default output goes to the current folder
        code, _, err = run_cli(capsys, "generate", "a bus", *model_args)
        assert code == 2 and "output file generate.png: cannot write there" in err


def test_a_full_disk_is_refused_before_loading(capsys, tmp_path, monkeypatch, no_loading, model_args, image_path):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    code, _, err = run_cli(capsys, "run", image_path, "p", "--image-output", "-o", tmp_path / "o.png", *model_args)
    assert code == 2 and f"output file {tmp_path / 'o.png'}: only 4,096 bytes free in {tmp_path}" in err


def test_a_prompt_too_long_is_warned_about_on_one_line(capsys, preloaded, model_args, image_path):
    question = "what is " + "very " * 70 + "big ?"
    code, out, err = run_cli(capsys, "vqa", image_path, question, *model_args)
    assert code == 0 and len(out.strip().splitlines()) == 1
    assert err.startswith("uio: warning: input_texts[0] is ") and "over max_input_len=64" in err
    assert len(err.strip().splitlines()) == 1


def test_library_errors_exit_1(capsys, tmp_path, conformance, image_path):
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"\x81\xa3abc\x05")
    code, out, err = run_cli(capsys, "caption", image_path, "--model", conformance / "tiny" / "config.json",
                             "--weights", broken, "--tokenizer", conformance / "tokenizer" / "spiece.model")
    assert code == 1 and err.startswith("uio: error: ") and str(broken) in err
    assert len(err.strip().splitlines()) == 1


def test_info_lists_the_cache(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UIO_HOME", str(tmp_path))
    (tmp_path / "small.safetensors").write_bytes(b"12345")
    record = run_json(capsys, "info")
    assert record["cache_dir"] == str(tmp_path) and record["torch"] == torch.__version__
    assert record["cached_files"] == [{"path": str(tmp_path / "small.safetensors"), "bytes": 5}]


def test_download_offline_says_what_to_fetch(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UIO_HOME", str(tmp_path))
    monkeypatch.setenv("UIO_OFFLINE", "1")
    code, out, err = run_cli(capsys, "download", "--tokenizer-only")
    assert code == 1 and "spiece.model" in err and "Traceback" not in err


def test_download_fetches_the_checkpoint_and_vocabulary_once(capsys, tmp_path, monkeypatch):
    from helpers_http import FileServer
    from uio import hub
    from uio.checkpoint import write_bin

    write_bin({"w/kernel": np.ones((3, 4), np.float32)}, tmp_path / "w.bin")
    weights, vocab = (tmp_path / "w.bin").read_bytes(), b"v" * 2000
    monkeypatch.setitem(hub.CHECKPOINTS, "base", hub.RemoteFile("base_1000k.bin", len(weights)))
    monkeypatch.setattr(hub, "TOKENIZER", hub.RemoteFile("spiece.model", len(vocab)))
    monkeypatch.setenv("UIO_HOME", str(tmp_path))
    monkeypatch.delenv("UIO_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    files = {"/w/base_1000k.bin": weights, "/t5-base/resolve/main/spiece.model": vocab}
    with FileServer(files) as server:
        monkeypatch.setenv("UIO_BASE_URL", server.url("/w"))
        monkeypatch.setenv("HF_ENDPOINT", server.base_url)
        record = run_json(capsys, "download", "base")
        assert run_json(capsys, "download", "base") == record  # cached: no second request
    assert len(server.requests) == 2
    assert record["cache_dir"] == str(tmp_path)
    assert open(record["checkpoint"], "rb").read() == weights and open(record["tokenizer"], "rb").read() == vocab


def test_draw_helpers():
    image = np.zeros((40, 60, 3), np.uint8)
    boxed = np.array(draw.draw_boxes(image, [[5, 5, 30, 20]], ["x"]))
    assert boxed.shape == (40, 60, 3) and boxed[20, 15:25].any() and not image.any()
    mask = np.zeros((40, 60), bool)
    mask[:10] = True
    tinted = np.array(draw.overlay_masks(np.full((40, 60, 3), 1.0), [mask]))
    assert (tinted[0] != 255).any() and (tinted[20] == 255).all()
    with pytest.raises(ValueError):
        draw.overlay_masks(image, [np.zeros((4, 4), bool)])
    assert draw.grayscale(np.ones((4, 5, 3)) * 0.5).getpixel((0, 0)) == 128


def test_console_entry_point():
    result = subprocess.run([sys.executable, "-m", "uio.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in [task.command for task in TASKS.values()] + ["run", "convert", "demo", "download", "info"]:
        assert command in result.stdout


def test_runner_options_reach_the_runner(model_args, image_path):
    from uio.accel.packing import packed_matmul_supported
    from uio.accel.transformer_ops import packed_copies

    parse = lambda *extra: cli.build_parser().parse_args(["vqa", image_path, "what ?", *model_args, *extra])  # noqa: E731
    assert packed_copies(cli.load_runner(parse("--no-prepack")).model) == []
    assert bool(packed_copies(cli.load_runner(parse("--prepack")).model)) == packed_matmul_supported(torch.float32)
    by_default = packed_matmul_supported(torch.float32) and not cpu_kernels.in_use(torch.float32)
    assert bool(packed_copies(cli.load_runner(parse()).model)) == by_default
    assert cli.load_runner(parse("--stop-at-eos")).stop_at_eos and not cli.load_runner(parse()).stop_at_eos


def test_serve_without_the_extra_says_how_to_install_it(capsys, monkeypatch, model_args):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    for name in [name for name in sys.modules if name.startswith("uio.server")]:
        monkeypatch.delitem(sys.modules, name)
    code, out, err = run_cli(capsys, "serve", *model_args)
    assert code == 2 and out == ""
    assert "needs the serve extra (fastapi is not installed): pip install 'unified-io[serve]'" in err

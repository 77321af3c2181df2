"""``uio batch`` on the tiny checkpoint: every task through JSONL, folder jobs, resume, bad input."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uio import batch, cli, cli_batch
from uio.requests import TaskRequest, render
from uio.runner import ModelRunner

QUESTION = "What color is the sofa?"


@pytest.fixture()
def preloaded(monkeypatch, tiny_runner) -> None:
    """Jobs get the module's tiny runner instead of loading the checkpoint again."""
    monkeypatch.setattr(cli_batch, "load_runner", lambda args: tiny_runner)


@pytest.fixture()
def no_model(monkeypatch) -> None:
    """Jobs that must not load the model fail the test if they do."""
    def refuse(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_batch, "load_runner", refuse)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, test_image) -> Path:
    """Images and masks the requests name: the conformance picture, a smaller one in a sub-folder, two masks."""
    folder = tmp_path_factory.mktemp("inputs")
    Image.fromarray(test_image).save(folder / "room.png")
    (folder / "sub").mkdir()
    Image.fromarray(test_image[100:300, 200:500]).save(folder / "sub" / "crop.jpg", quality=95)
    mask = np.zeros((64, 64), np.uint8)
    mask[:32] = 255
    Image.fromarray(mask).save(folder / "top.png")
    Image.fromarray(255 - mask).save(folder / "bottom.png")
    (folder / "not-an-image.png").write_text("hello")
    return folder


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def run_batch(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["batch", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def read_results(path: Path) -> dict:
    """The output's records by id; fails on an id written twice."""
    records = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        assert record["id"] not in records, f"id {record['id']!r} written twice"
        records[record["id"]] = record
    return records


def load(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


# ---- every task ---------------------------------------------------------------------------------

ALL_TASKS = [
    {"id": "caption", "task": "caption", "image": "room.png"},
    {"id": "vqa", "task": "vqa", "image": "room.png", "question": QUESTION},
    {"id": "vqa two decodes", "task": "vqa", "image": "sub/crop.jpg", "question": "what is it?", "num_decodes": 2},
    {"id": "depth", "task": "depth", "image": "room.png"},
    {"id": "normals", "task": "surface_normal", "image": "sub/crop.jpg"},
    {"id": "generation", "task": "image_generation", "description": "a red car"},
    {"id": "inpainting", "task": "image_inpainting", "image": "room.png", "location": [100, 50, 300, 200],
     "replace_with": "a dog"},
    {"id": "segmentation", "task": "object_segmentation", "image": "room.png", "object_name": "sofa"},
    {"id": "refexp", "task": "refexp", "image": "room.png", "expression": "the left sofa"},
    {"id": "localization", "task": "object_localization", "image": "room.png", "object_name": "lamp"},
    {"id": "region caption", "task": "region_caption", "image": "room.png", "location": [10, 20, 300, 400]},
    {"id": "region class", "task": "region_classification", "image": "room.png", "location": [10, 20, 300, 400],
     "answer_options": ["sofa", "table", "lamp"]},
    {"id": "classification", "task": "image_classification", "image": "sub/crop.jpg"},
    {"id": "pose", "task": "pose", "image": "room.png", "location": [50, 50, 400, 450]},
    {"id": "seg generation", "task": "segmentation_based_generation", "binary_masks": ["top.png", "bottom.png"],
     "labels": ["sky", "grass"]},
    {"id": "run text", "task": "run", "image": "room.png", "prompt": "what is in the room ?"},
    {"id": "run image", "task": "run", "prompt": "a photo of a dog", "image_output": True},
]
# Compared through the task whose model call and output they share (depth, seg generation), to keep the test short.
SAME_PATH_AS_ANOTHER = ("normals", "generation")


def direct_call(runner: ModelRunner, line: dict, folder: Path) -> tuple[TaskRequest, dict]:
    """The request a line describes, and its result from a ModelRunner call of its own."""
    inputs = {key: value for key, value in line.items() if key not in ("id", "task", "num_decodes")}
    if "image" in inputs:
        inputs["image"] = load(folder / inputs["image"])
    if "binary_masks" in inputs:
        inputs["binary_masks"] = [np.array(Image.open(folder / name).convert("L")) > 127
                                  for name in inputs["binary_masks"]]
    request = TaskRequest(line["task"], inputs, num_decodes=line.get("num_decodes"))
    if line["task"] == "run":
        out = runner.run([inputs.get("image")], [inputs["prompt"]], output_text_len=1 if inputs.get("image_output")
                         else 32, generate_image=bool(inputs.get("image_output")))
        result = {"text": None if out["text"] is None else out["text"][0],
                  "image": None if out["image"] is None else out["image"][0], "score": out["score"][0]}
    else:
        result = getattr(runner, line["task"])(**inputs, num_decodes=line.get("num_decodes"))
    return request, result


def without_scores(record: dict) -> dict:
    return {key: [without_scores(d) for d in value] if key == "decodes" else value
            for key, value in record.items() if key != "score"}


def scores(record: dict) -> list[float]:
    return [record["score"], *(decode["score"] for decode in record.get("decodes", []))]


@pytest.fixture(scope="module")
def all_tasks_job(tmp_path_factory, image_folder, tiny_runner, model_args):
    """The every-task JSONL run once by ``uio batch`` (with --draw), in-process on the tiny runner."""
    out = tmp_path_factory.mktemp("all-tasks")
    jsonl = write_jsonl(image_folder / "all.jsonl", ALL_TASKS)
    patch = pytest.MonkeyPatch()
    patch.setattr(cli_batch, "load_runner", lambda args: tiny_runner)
    try:
        code = cli.main(["batch", str(jsonl), "-o", str(out / "results.jsonl"), "--draw", "--quiet", *model_args])
    finally:
        patch.undo()
    return code, out


def test_every_task_through_jsonl_equals_direct_calls(all_tasks_job, tiny_runner, image_folder):
    code, out = all_tasks_job
    assert code == 0
    records = read_results(out / "results.jsonl")
    assert sorted(records) == sorted(line["id"] for line in ALL_TASKS)
    for line in ALL_TASKS:
        record = records[line["id"]]
        assert "error" not in record, record
        if line["id"] in SAME_PATH_AS_ANOTHER:
            continue
        request, result = direct_call(tiny_runner, line, image_folder)
        expected, images = render(request, result, tiny_runner.tokenizer)
        written = {}
        for part in [record, *record.get("decodes", [])]:
            if "output" in part:
                path = Path(part["output"])
                assert path.parent == out / "results-images" and path.name.startswith(batch.image_stem(line["id"]))
                written[path.name.removeprefix(batch.image_stem(line["id"]) + ".")] = load(path)
                part["output"] = path.name.removeprefix(batch.image_stem(line["id"]) + ".")
        # Batched with others, a score may differ from its call alone by fp32 rounding (padding
        # changes the sums' order); the outputs themselves are the same.
        assert without_scores(record) == without_scores({"id": line["id"], **expected}), line["id"]
        assert scores(record) == pytest.approx(scores(expected), rel=1e-5, abs=1e-5), line["id"]
        assert sorted(written) == sorted(images), line["id"]
        for name, image in images.items():
            np.testing.assert_array_equal(written[name], np.array(image.convert("RGB")), err_msg=line["id"])


def test_every_task_outputs_what_the_task_gives(all_tasks_job):
    records = read_results(all_tasks_job[1] / "results.jsonl")
    assert isinstance(records["vqa"]["text"], str) and len(records["vqa two decodes"]["decodes"]) == 2
    for name in ("depth", "normals", "inpainting", "segmentation", "refexp", "pose"):  # drawn at the input's size
        assert (records[name]["width"], records[name]["height"]) == ((300, 200) if name == "normals" else (640, 480))
    for name in ("generation", "seg generation", "run image"):
        assert (records[name]["width"], records[name]["height"]) == (256, 256)
    assert records["region class"]["text"] in ("sofa", "table", "lamp")


def test_boxes_and_keypoints_are_drawn_only_with_draw(capsys, preloaded, tmp_path, image_folder, model_args):
    jsonl = write_jsonl(image_folder / "refexp.jsonl", [ALL_TASKS[8]])
    code, _, err = run_batch(capsys, jsonl, "-o", tmp_path / "r.jsonl", *model_args)
    assert code == 0, err
    record = read_results(tmp_path / "r.jsonl")["refexp"]
    assert "boxes" in record and "output" not in record
    assert not (tmp_path / "r-images").exists()


# ---- folders ----------------------------------------------------------------------------------

def test_folder_job_ids_are_relative_paths(capsys, preloaded, tmp_path, test_image, tiny_runner, model_args):
    folder = tmp_path / "photos"
    (folder / "a" / "b").mkdir(parents=True)
    Image.fromarray(test_image).save(folder / "one.png")
    Image.fromarray(test_image[::2, ::3]).save(folder / "a" / "b" / "two.jpg")
    Image.fromarray(test_image).save(folder / ".hidden.png")
    (folder / "notes.txt").write_text("not an image")
    output = folder / "out" / "results.jsonl"  # inside the folder: its images must not become inputs
    argv = [folder, "--task", "vqa", "--question", QUESTION, "-o", output, *model_args]
    code, out, err = run_batch(capsys, *argv)
    assert code == 0, err
    records = read_results(output)
    assert sorted(records) == ["a/b/two.jpg", "one.png"]
    for name, record in records.items():
        assert record["text"] == tiny_runner.vqa(load(folder / name), QUESTION)["text"]
    code, out, _ = run_batch(capsys, *argv)
    assert code == 0 and "0 done now, 2 done before" in out


def test_folder_job_of_an_image_task_writes_images(capsys, preloaded, tmp_path, test_image, tiny_runner,
                                                   model_args):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(test_image[:200, :300]).save(folder / "x.png")
    argv = [folder, "--task", "region_caption", "--box", 10, 10, 100, 100, "-o", tmp_path / "r.jsonl",
            "--output-images", tmp_path / "pictures", *model_args]
    code, _, err = run_batch(capsys, *argv)
    assert code == 0, err
    record = read_results(tmp_path / "r.jsonl")["x.png"]
    assert record["text"] == tiny_runner.region_caption(test_image[:200, :300], [10, 10, 100, 100])["text"]


@pytest.mark.parametrize("argv, message", [
    (["--question", "why?"], "give --task"),
    (["--task", "depth", "--question", "why?"], "--question is not an argument of depth"),
    (["--task", "image_generation"], "takes no input image"),
])
def test_folder_job_usage_errors(capsys, no_model, tmp_path, test_image, model_args, argv, message):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(test_image).save(folder / "x.png")
    code, _, err = run_batch(capsys, folder, "-o", tmp_path / "r.jsonl", *argv, *model_args)
    assert code == 2 and message in err


# ---- bad input ----------------------------------------------------------------------------------

def test_bad_items_fail_alone_and_the_job_goes_on(capsys, preloaded, tmp_path, image_folder, model_args,
                                                  monkeypatch):
    lines = [
        {"id": "good", "task": "vqa", "image": "room.png", "question": QUESTION},
        {"id": "missing", "task": "vqa", "image": "nowhere.png", "question": QUESTION},
        {"id": "unreadable", "task": "caption", "image": "not-an-image.png"},
        {"id": "short box", "task": "region_caption", "image": "room.png", "location": [1, 2, 3]},
        {"id": 7, "task": "dance", "image": "room.png"},
        {"id": "typo", "task": "vqa", "image": "room.png", "questoin": QUESTION},
        {"id": "not text", "task": "vqa", "image": "room.png", "question": 12},
        '{"id": "broken", "task": ',
        {"task": "vqa", "image": "room.png", "question": QUESTION},
        '["a list"]',
        {"id": "also good", "task": "caption", "image": "sub/crop.jpg"},
    ]
    jsonl = write_jsonl(image_folder / "bad.jsonl", lines)
    output = tmp_path / "results.jsonl"
    code, out, err = run_batch(capsys, jsonl, "-o", output, *model_args)
    assert code == 1
    records = read_results(output)
    assert set(records) == {"good", "missing", "unreadable", "short box", 7, "typo", "not text", "also good"}
    assert "text" in records["good"] and "text" in records["also good"]
    expected = {"missing": "nowhere.png: no such file", "unreadable": "not-an-image.png", "short box": "location",
                7: "unknown task 'dance'", "typo": "'questoin'", "not text": "question must be a string"}
    for item_id, message in expected.items():
        assert message in records[item_id]["error"], records[item_id]
    assert "6 failed" in out and str(output) in out
    assert "bad.jsonl line 8: not valid JSON" in out
    assert "bad.jsonl line 9" in out and "bad.jsonl line 10" in out
    assert "nowhere.png" in err  # each failure is reported as it happens
    monkeypatch.setattr(cli_batch, "load_runner", lambda args: pytest.fail("nothing is left to run"))
    code, out, _ = run_batch(capsys, jsonl, "-o", output, *model_args)
    assert code == 1 and "0 done now, 8 done before, 6 failed" in out


def test_fail_fast_stops_at_the_first_failure(capsys, preloaded, tmp_path, image_folder, model_args):
    lines = [{"id": "missing", "task": "caption", "image": "nowhere.png"}] + [
        {"id": f"q{i}", "task": "caption", "image": "room.png"} for i in range(40)]
    jsonl = write_jsonl(tmp_path / "requests.jsonl", [{**line, "image": str(image_folder / line["image"])}
                                                       for line in lines])
    code, out, _ = run_batch(capsys, jsonl, "-o", tmp_path / "r.jsonl", "--fail-fast", "--batch-size", 2,
                             *model_args)
    assert code == 1 and "--fail-fast" in out
    records = read_results(tmp_path / "r.jsonl")
    assert "error" in records["missing"] and 1 < len(records) < len(lines)  # the failed chunk, no more


def test_duplicate_ids_are_refused_before_any_work(capsys, no_model, tmp_path, image_folder, model_args):
    lines = [{"id": "a", "task": "caption", "image": "room.png"}, {"id": "b", "task": "caption", "image": "room.png"},
             {"id": "a", "task": "vqa", "image": "room.png", "question": QUESTION}]
    jsonl = write_jsonl(image_folder / "dupes.jsonl", lines)
    code, _, err = run_batch(capsys, jsonl, "-o", tmp_path / "r.jsonl", *model_args)
    assert code == 2
    assert "duplicate ids: 'a' (" in err and "line 1 and" in err and "line 3)" in err
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("argv, message", [
    (["nowhere.jsonl"], "no such file or folder"),
    (["{jsonl}", "--question", "why?"], "--question is for folder inputs"),
    (["{jsonl}", "--batch-size", "0"], "positive integer"),
])
def test_usage_errors(capsys, no_model, tmp_path, model_args, argv, message):
    jsonl = write_jsonl(tmp_path / "r.jsonl", [{"id": 1, "task": "caption", "image": "x.png"}])
    argv = [str(jsonl) if a == "{jsonl}" else a for a in argv]
    code, _, err = run_batch(capsys, *argv, "-o", tmp_path / "out.jsonl", *model_args)
    assert code == 2 and message in err


def test_an_output_that_is_not_a_results_file_is_refused(capsys, no_model, tmp_path, image_folder, model_args):
    output = tmp_path / "notes.jsonl"
    output.write_text('{"id": 1, "text": "x"}\nsome notes\n')
    jsonl = write_jsonl(image_folder / "one.jsonl", [{"id": 1, "task": "caption", "image": "room.png"}])
    code, _, err = run_batch(capsys, jsonl, "-o", output, *model_args)
    assert code == 2 and "line 2 is not a result record" in err
    assert output.read_text() == '{"id": 1, "text": "x"}\nsome notes\n'


# ---- resume -----------------------------------------------------------------------------------

def test_partial_last_line_is_repaired(capsys, preloaded, tmp_path, image_folder, model_args):
    lines = [{"id": f"c{i}", "task": "caption", "image": "room.png" if i % 2 else "sub/crop.jpg"} for i in range(3)]
    jsonl = write_jsonl(image_folder / "three.jsonl", lines)
    reference = tmp_path / "reference.jsonl"
    assert run_batch(capsys, jsonl, "-o", reference, *model_args)[0] == 0
    output = tmp_path / "results.jsonl"
    text = reference.read_text()
    cut = text[:text.rstrip("\n").rfind("\n") + 1] + text.rstrip("\n").splitlines()[-1][:20]  # killed mid-line
    output.write_text(cut)
    code, out, _ = run_batch(capsys, jsonl, "-o", output, *model_args)
    assert code == 0 and "cut off a partial last line (20 bytes)" in out and "1 done now, 2 done before" in out
    assert read_results(output) == read_results(reference)


def test_quiet_shows_no_progress_bar(capsys, preloaded, tmp_path, image_folder, model_args):
    jsonl = write_jsonl(image_folder / "q.jsonl", [{"id": 1, "task": "caption", "image": "room.png"}])
    code, _, err = run_batch(capsys, jsonl, "-o", tmp_path / "a.jsonl", *model_args)
    assert code == 0 and "uio batch" in err and "1/1" in err
    code, _, err = run_batch(capsys, jsonl, "-o", tmp_path / "b.jsonl", "--quiet", *model_args)
    assert code == 0 and err == ""


def test_json_summary(capsys, preloaded, tmp_path, image_folder, model_args):
    jsonl = write_jsonl(image_folder / "j.jsonl", [{"id": 1, "task": "caption", "image": "room.png"}])
    code, out, _ = run_batch(capsys, jsonl, "-o", tmp_path / "a.jsonl", "--quiet", "--json", *model_args)
    summary = json.loads(out)
    assert code == 0 and summary["command"] == "batch" and (summary["total"], summary["succeeded"]) == (1, 1)


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_resume_after_sigkill_gives_every_id_once_as_an_uninterrupted_run(tmp_path, image_folder, model_args):
    """A real ``uio batch`` process killed (SIGKILL) while loading, after its first lines and at
    random moments, then run to the end: the output equals an uninterrupted run's."""
    lines = [{"id": f"item/{i}", "task": ("refexp", "caption", "vqa")[i % 3],
              "image": "room.png" if i % 2 else "sub/crop.jpg", **({"question": "what is it?"} if i % 3 == 2 else {}),
              **({"expression": "the sofa"} if i % 3 == 0 else {})} for i in range(18)]
    jsonl = write_jsonl(image_folder / "resume.jsonl", lines)

    def command(output: Path) -> list[str]:
        return [sys.executable, "-m", "uio.cli", "batch", str(jsonl), "-o", str(output), "--draw", "--quiet",
                "--batch-size", "2", *model_args]

    reference = tmp_path / "reference.jsonl"
    subprocess.run(command(reference), check=True, capture_output=True, timeout=600)
    output = tmp_path / "resumed.jsonl"
    rng = random.Random(31)
    for moment in ("loading", "first lines", "random", "random"):
        process = subprocess.Popen(command(output), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before, deadline = lines_in(output), time.monotonic() + 300
        if moment == "loading":
            time.sleep(rng.uniform(0.5, 3))
        else:
            while process.poll() is None and lines_in(output) == before and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 3) if moment == "random" else 0)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finished = subprocess.run(command(output), capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    reference_text = reference.read_text().replace(str(tmp_path / "reference-images"), str(tmp_path / "resumed-images"))
    assert read_results(output) == read_results(write_jsonl(tmp_path / "expected.jsonl",
                                                            reference_text.splitlines()))
    reference_images = sorted(os.listdir(tmp_path / "reference-images"))
    assert sorted(os.listdir(tmp_path / "resumed-images")) == reference_images  # no temporary files left
    for name in reference_images:
        assert (tmp_path / "resumed-images" / name).read_bytes() == (tmp_path / "reference-images" / name).read_bytes()


# ---- names ------------------------------------------------------------------------------------

def test_image_names_are_safe_and_distinct():
    ids = ["a/b", "a_b", "a b", "a:b", "A", "a", "../../etc/passwd", "x" * 500, "ünïcødé", "CON", ".hidden", "-",
           "line\nbreak", "a\\b", 17]
    stems = [batch.image_stem(item_id) for item_id in ids]
    assert len({stem.lower() for stem in stems}) == len(ids)  # distinct even where case is ignored
    for stem in stems:
        assert len(stem) <= 100 and not stem.startswith((".", "-"))
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in stem)
    assert batch.image_stem("photos/cat 1.jpg").startswith("photos_cat_1.jpg-")


def test_the_core_does_not_import_ray():
    code = ("import sys, uio.batch, uio.cli, uio.cli_batch; uio.cli.build_parser(); "
            "assert not any(name == 'ray' or name.startswith('ray.') for name in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

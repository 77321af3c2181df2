"""``uio batch --ray`` and :class:`uio.ray_jobs.UIOPredictor` on a local Ray started by the tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uio import cli

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")

from test_batch import QUESTION, read_results, scores, without_scores, write_jsonl  # noqa: E402

from uio.ray_jobs import UIOPredictor  # noqa: E402  (needs Ray)


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of this machine for the module's tests, stopped after them."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory, test_image) -> Path:
    """A JSONL job of a few requests (text answers and drawn boxes) with its images."""
    folder = tmp_path_factory.mktemp("ray-job")
    Image.fromarray(test_image).save(folder / "room.png")
    Image.fromarray(test_image[50:350, 100:500]).save(folder / "crop.png")
    lines = [{"id": "vqa", "task": "vqa", "image": "room.png", "question": QUESTION},
             {"id": 2, "task": "caption", "image": "crop.png"},
             {"id": "refexp", "task": "refexp", "image": "room.png", "expression": "the sofa"},
             {"id": "missing", "task": "caption", "image": "nowhere.png"},
             {"id": "region", "task": "region_caption", "image": "crop.png", "location": [10, 10, 200, 150]}]
    return write_jsonl(folder / "requests.jsonl", lines)


@pytest.fixture(scope="module")
def local_results(job, tmp_path_factory, model_args) -> Path:
    """The job run without Ray."""
    output = tmp_path_factory.mktemp("local") / "results.jsonl"
    assert cli.main(["batch", str(job), "-o", str(output), "--draw", "--quiet", *model_args]) == 1  # one is missing
    return output


def same_results(path: Path, reference: Path) -> None:
    """The records of ``path`` equal those of ``reference`` (scores to fp32 rounding), and so do their images."""
    got, expected = read_results(path), read_results(reference)
    assert sorted(map(str, got)) == sorted(map(str, expected))
    for key, record in expected.items():
        if "output" in record:
            assert Path(got[key]["output"]).read_bytes() == Path(record["output"]).read_bytes()
            got[key]["output"] = record["output"]
        if "error" in record:
            assert got[key] == record
        else:
            assert without_scores(got[key]) == without_scores(record)
            assert scores(got[key]) == pytest.approx(scores(record), rel=1e-5, abs=1e-5)


def test_ray_job_gives_the_local_results(capsys, local_ray, job, local_results, tmp_path, model_args):
    output = tmp_path / "results.jsonl"
    code = cli.main(["batch", str(job), "-o", str(output), "--draw", "--ray", "--replicas", "1", *model_args])
    out, err = capsys.readouterr()
    assert code == 1 and "4 done now, 0 done before, 1 failed" in out
    assert "nowhere.png: no such file" in err
    same_results(output, local_results)


def test_resumed_ray_job_skips_done_ids(capsys, local_ray, job, local_results, tmp_path, model_args, monkeypatch):
    output = tmp_path / "results.jsonl"
    done = local_results.read_text().splitlines(keepends=True)[:3]
    output.write_text("".join(done))
    (tmp_path / "results-images").mkdir()
    for line in done:  # the images those lines name, where this output keeps its images
        record = json.loads(line)
        if "output" in record:
            Path(record["output"]).replace(tmp_path / "results-images" / Path(record["output"]).name)
    assert cli.main(["batch", str(job), "-o", str(output), "--draw", "--ray", "--json", *model_args]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert not any("error" in json.loads(line) for line in done)
    assert summary["skipped"] == len(done) and summary["succeeded"] + summary["failed"] == 5 - len(done)
    assert output.read_text().startswith("".join(done))
    assert len(output.read_text().splitlines()) == 5


def test_uio_predictor_in_a_pipeline_of_ones_own(local_ray, job, local_results, tiny_runner_options):
    lines = [json.loads(line) for line in job.read_text().splitlines()]
    lines = [line for line in lines if line["task"] == "caption"]  # one schema: read_json's columns
    dataset = ray.data.from_items([{**line, "id": str(line["id"])} for line in lines])
    out = dataset.map_batches(UIOPredictor, fn_constructor_kwargs={"runner_options": tiny_runner_options,
                                                                   "base_dir": str(job.parent)},
                              concurrency=1, batch_size=4)
    rows = {row["id"]: row for row in out.take_all()}
    expected = {str(key): record for key, record in read_results(local_results).items()}
    assert sorted(rows) == sorted(str(line["id"]) for line in lines)
    for key, row in rows.items():
        record = json.loads(row["record"])
        assert {**record, "id": str(record["id"])}.keys() == expected[key].keys()
        assert record.get("text") == expected[key].get("text") and record.get("error") == expected[key].get("error")
        assert list(row["image_names"]) == [] and np.size(row["image_pngs"]) == 0

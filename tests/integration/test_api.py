"""The public API (`import imgtune`): the names it exports, and a job trained, evaluated, reported, served and
queried through it alone, as the README's Python example does."""

from __future__ import annotations

import subprocess
import sys

import pytest

import imgtune


def test_the_public_names_load_and_importing_imgtune_stays_cheap():
    assert set(imgtune.__all__) >= {"train", "tune", "evaluate", "deploy", "open_job", "JobConfig", "__version__"}
    for name in imgtune.__all__:
        assert getattr(imgtune, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        _ = imgtune.trian
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, imgtune; print('torch' in sys.modules, 'ray' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.split() == ["False", "False"]


def test_a_job_end_to_end_through_the_public_api(tmp_path, dogs_mini, mobilenet_weights):
    job = imgtune.train(
        dogs_mini,
        backbone="mobilenet_v2",
        weights=mobilenet_weights,
        epochs=2,
        image_size=64,
        name="api-job",
        overrides=["data.num_workers=0", "train.batch_size=32"],
        profiler=False,
        workspace=tmp_path,
        progress=False,
    )
    record = job.record()
    assert isinstance(record, imgtune.JobRecord)
    assert record.status == "completed" and record.epochs_run == 2 and record.test["samples"] == 100
    assert record.config["train"]["batch_size"] == 32 and record.debugger  # the debugger is on by default
    assert imgtune.open_job("api-job", tmp_path).path == job.path
    assert [j.name for j in imgtune.list_jobs(tmp_path)] == ["api-job"]
    assert imgtune.job_summary(job)["test"]["accuracy"] == record.test["accuracy"]

    valid = imgtune.evaluate(job, dogs_mini, split="valid", progress=False)
    assert valid["samples"] == 100 and job.record().evaluations[-1]["split"] == "valid"
    assert imgtune.write_report(job).name == "report.html"

    photos = sorted((dogs_mini / "test" / "001.Shih-Tzu").iterdir())[:2]
    here = imgtune.predict(photos, job=job, top_k=3)
    with imgtune.deploy(job, port=0, background=True, max_batch_size=4) as endpoint:
        there = imgtune.predict(photos, endpoint=endpoint.url, top_k=3)
    assert [r["classes"][0]["id"] for r in here] == [r["classes"][0]["id"] for r in there]
    assert len(here[0]["classes"]) == 3
    with pytest.raises(imgtune.ConfigError, match="--job JOB or --endpoint URL"):
        imgtune.predict(photos)

"""Each fine-tuning recipe (`--recipe frozen|finetune|finetune-strong`) trains a job end to end on tiny settings."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import imgtune
from imgtune.cli import app
from imgtune.config.job import RECIPES


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["frozen", "finetune", "finetune-strong"])
def test_each_recipe_trains_a_job_end_to_end(recipe, dogs_mini, mobilenet_weights, tmp_path):
    job = imgtune.train(
        dogs_mini, backbone="mobilenet_v2", weights=mobilenet_weights, recipe=recipe, epochs=2, image_size=32,
        overrides=["data.num_workers=0", "train.batch_size=32"], workspace=tmp_path, progress=False,
    )  # fmt: skip
    record = job.record()
    assert record.status == "completed" and record.config["recipe"] == recipe
    for section, values in RECIPES[recipe].items():
        assert {k: record.config[section][k] for k in values} == values  # the recipe's values, recorded
    metrics = job.read_metrics()
    assert [m["epoch"] for m in metrics] == [1, 2] and record.test["samples"] > 0
    if recipe == "frozen":
        assert record.training_mode == "features"
        return
    assert record.training_mode == "images"
    warmup = record.config["train"]["warmup_epochs"]
    steps = metrics[0]["step"]
    assert metrics[0]["lr"] == pytest.approx(1e-3 / (warmup * steps))  # the first step of the warmup
    assert "batch-norm statistics stay as pretrained" in job.log_file.read_text()
    predictions = imgtune.predict([next((dogs_mini / "test").rglob("*.jpg"))], job=job)
    assert predictions[0]["classes"]
    if recipe == "finetune-strong":  # train.tta=flip: `imgtune evaluate` does as the job did, unless told not to
        as_the_job = imgtune.evaluate(job, dogs_mini, workspace=tmp_path, progress=False)
        plain = imgtune.evaluate(job, dogs_mini, workspace=tmp_path, progress=False, tta=False)
        assert (as_the_job["tta"], plain["tta"]) == ("flip", "none") and as_the_job["loss"] != plain["loss"]
        assert as_the_job["accuracy"] == pytest.approx(record.test["accuracy"], abs=0.02)


def test_the_recipe_flag_is_a_config_key(tmp_path, dogs_mini):
    """`--recipe` and `--set recipe=...` are the same key; a bad name is refused before any work."""
    result = CliRunner().invoke(app, ["train", "--data", str(dogs_mini), "--recipe", "finetune-weak"])
    assert result.exit_code == 2 and "recipe" in result.output

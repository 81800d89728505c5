"""The tracker options: what the CLI flags turn into, and the settings refused before a job exists."""

from __future__ import annotations

import pytest

from imgtune.cli.common import tracking_overrides
from imgtune.config import apply_overrides, build_config
from imgtune.core.errors import ConfigError
from imgtune.tracking.mlflow_run import flat_params


def tracking_of(*flags: str | bool | None, **named) -> dict:
    raw = apply_overrides({"data": {"path": "photos"}}, tracking_overrides(*flags, **named))
    return build_config(raw).tracking.model_dump()


def test_a_uri_or_a_registered_name_turns_mlflow_on():
    assert tracking_of()["mlflow"] is False
    assert tracking_of(mlflow_uri="http://127.0.0.1:5000")["mlflow"] is True
    tracked = tracking_of(register="dogs", alias="champion", experiment="team: vision")
    assert tracked["mlflow"] and tracked["registered_model"] == "dogs" and tracked["alias"] == "champion"
    assert tracked["experiment"] == "team: vision"  # quoted: a YAML-looking name stays a string
    assert tracking_of(tensorboard=True)["tensorboard"] is True


def test_settings_that_contradict_each_other_are_refused():
    with pytest.raises(ConfigError, match="alias needs tracking.registered_model"):
        build_config({"data": {"path": "p"}, "tracking": {"mlflow": True, "alias": "champion"}})
    with pytest.raises(ConfigError, match="need tracking.mlflow"):
        build_config({"data": {"path": "p"}, "tracking": {"registered_model": "dogs"}})


def test_the_config_becomes_flat_mlflow_params():
    params = flat_params({"train": {"lr": 0.001, "early_stopping": {"patience": 5}}, "name": None, "tags": []})
    assert params == {"train.lr": "0.001", "train.early_stopping.patience": "5", "name": "null", "tags": "[]"}
    assert len(flat_params({"long": "x" * 10_000})["long"]) == 6000  # MLflow's longest param value

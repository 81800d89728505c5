"""What a resumed tuning job starts from (found by the tuning chaos test, tests/integration/test_chaos_tuning.py):
its study samples new points, and a Ray state its driver never saved is rebuilt, not restored."""

from __future__ import annotations

from imgtune.config import TuneOptions
from imgtune.storage.jobs import RAY_STATE_DIR, Job
from imgtune.tuning.space import DEFAULT_SPACE, parse_space


def test_a_resumed_study_samples_other_points_than_its_first_trials(tmp_path):
    """The sampler's draws depend on its seed, not on the trials the study holds: a resumed study seeded as the
    job was would draw its first trials' points again (a job killed after each batch tried only those)."""
    from imgtune.tuning.batched import distributions, open_study

    job = Job(tmp_path)
    space = parse_space(DEFAULT_SPACE)
    for strategy in ("bayesian", "random"):
        (tmp_path / "optuna.journal").unlink(missing_ok=True)
        options = TuneOptions(base={}, space=DEFAULT_SPACE, strategy=strategy, max_trials=8)
        first = open_study(job, options, space, [], resumed=False)
        before = [first.ask(distributions(space)).params for _ in range(2)]
        resumed = open_study(job, options, space, [], resumed=True)
        after = [resumed.ask(distributions(space)).params for _ in range(2)]
        assert len(resumed.trials) == 4
        assert not [point for point in after if point in before], (strategy, before, after)
        again = open_study(job, options, space, [], resumed=True)  # a resume is as reproducible as a start
        assert [again.ask(distributions(space)).params for _ in range(2)] != after  # (4 trials now: another seed)


def test_a_ray_state_its_driver_never_saved_is_rebuilt_not_restored(tmp_path):
    """Ray writes tuner.pkl as a Tuner starts and its searcher's state only at its first save; restored from
    tuner.pkl alone, the searcher has no search space and every resume failed. Nothing is unpickled here."""
    from imgtune.tuning.tuner import EXPERIMENT, _why_rebuild

    experiment = tmp_path / RAY_STATE_DIR / EXPERIMENT
    experiment.mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(b"not a pickle: a restore would fail on it")
    assert "was never saved" in _why_rebuild(Job(tmp_path), experiment)
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    assert _why_rebuild(Job(tmp_path), experiment) is None  # saved: restored

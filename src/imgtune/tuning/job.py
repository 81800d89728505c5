"""Where imgtune 0.1 kept its Ray Tune callbacks: the experiment state a tuning job of that version saved
(JOB/ray, restored by `imgtune tune --resume`) names them by this module, so it stays importable."""

from imgtune.tuning.tuner import NoImprovementStopper, TrialProgress

__all__ = ["NoImprovementStopper", "TrialProgress"]

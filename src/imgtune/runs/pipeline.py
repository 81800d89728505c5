"""The original notebook end to end, in one call: check the data, tune, train the final model with the best
hyperparameters (debugger and profiler on), serve it, ask the endpoint about one test photo per class, and
summarise. The pipeline is a job directory of its own (kind "pipeline") naming the jobs it made.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgtune.config import PipelineOptions, ServeOptions, TuneOptions, merge
from imgtune.core.errors import DataError
from imgtune.core.io import cache_dir
from imgtune.data.check import check_layout
from imgtune.data.folders import discover
from imgtune.data.sources import resolve_source
from imgtune.runs.lifecycle import JobLifecycle
from imgtune.runs.tune import run_tuning_job, train_best
from imgtune.serving.client import EndpointClient
from imgtune.serving.server import BackgroundEndpoint
from imgtune.storage.jobs import Job
from imgtune.storage.record import JobRecord
from imgtune.tuning.space import DEFAULT_SPACE

Say = Callable[[str], None]


def _sample_photos(report: Any) -> list[tuple[str, Path]]:
    """One photo per class from the test split (valid's, or any split's, where there is none)."""
    split = next((s for s in ("test", "valid", *report.good) if report.good.get(s)), None)
    if split is None:
        return []
    by_class = report.good[split]
    return [(cls, Path(min(infos, key=lambda f: f.path).path)) for cls, infos in sorted(by_class.items()) if infos]


def run_pipeline(
    options: PipelineOptions,
    *,
    workspace: str | Path | None = None,
    progress: bool = True,
    say: Say = lambda message: None,
    keep_serving: Callable[[str], None] | None = None,
) -> Job:
    """Run every step; `keep_serving(url)`, when given, is called while the endpoint is still up (it returns when
    serving should stop). Returns the pipeline's job, whose job.json holds the summary."""
    record = JobRecord(name=options.name or "", kind="pipeline", options=options.model_dump(mode="json"))
    steps: dict[str, float] = {}

    def pipeline(life: JobLifecycle) -> dict[str, Any]:
        job = life.job

        def step(name: str, begun: float) -> None:
            steps[name] = round(time.perf_counter() - begun, 2)
            job.update(step_seconds=steps)

        begun = time.perf_counter()
        say("1/5 checking the data")
        root = resolve_source(options.data, progress=progress)
        report = check_layout(discover(root), cache_dir=cache_dir(), progress=progress)
        if report.fatal:
            errors = "; ".join(issue.message for issue in report.issues if issue.severity == "error")
            raise DataError(f"the dataset at {options.data} cannot be trained on: {errors}", "see `imgtune data check`")
        usable = sum(len(infos) for by_class in report.good.values() for infos in by_class.values())
        job.update(data_check={"usable_images": usable, "problem_files": len(report.problems)})
        step("data_check", begun)

        begun = time.perf_counter()
        say(f"2/5 tuning: {options.max_trials} trials, learning rate x batch size")
        base = {
            "data": {"path": options.data},
            "model": {"backbone": options.backbone, "weights": options.weights},
            "train": {"epochs": options.epochs},
            "debugger": {"enabled": False},
            "profiler": {"enabled": False, "report": False},
        }
        tuning = run_tuning_job(
            TuneOptions(
                base=merge(base, options.overrides),
                space=DEFAULT_SPACE,
                strategy=options.strategy,
                max_trials=options.max_trials,
                max_parallel=options.max_parallel,
                name=f"{job.name}-tune",
            ),
            workspace=job.path.parent,
            progress=progress,
        )
        job.update(tuning_job=tuning.name)
        step("tuning", begun)

        begun = time.perf_counter()
        say("3/5 training the final model with the best hyperparameters (debugger and profiler on)")
        final = train_best(tuning, name=f"{job.name}-final", progress=progress)
        job.update(final_job=final.name, test=final.record().test, best_hyperparameters=tuning.record().best)
        step("final_training", begun)

        begun = time.perf_counter()
        say("4/5 serving the final model")
        with BackgroundEndpoint(final.path, ServeOptions(), port=options.port) as endpoint:
            job.update(endpoint=endpoint.url)
            step("endpoint_start", begun)
            begun = time.perf_counter()
            say(f"5/5 asking {endpoint.url} about one photo per class")
            client = EndpointClient(endpoint.url)
            predictions = []
            for class_id, photo in _sample_photos(report):
                top = client.predict_file(photo, top_k=3)
                predictions.append(
                    {"file": str(photo), "class": class_id, "predicted": top[0]["id"],
                     "probability": top[0]["probability"], "correct": top[0]["id"] == class_id}
                )  # fmt: skip
            job.update(sample_predictions=predictions)
            step("sample_predictions", begun)
            if keep_serving is not None:
                keep_serving(endpoint.url)
        artifacts = {
            "tuning_report": str(tuning.path / "report.html"),
            "final_report": str(final.path / "report.html"),
            "model": str(final.model_dir),
        }
        if job.remote:  # an s3:// workspace: every job is in the bucket too
            artifacts["kept_in"] = job.remote.rsplit("/", 1)[0]
        return {"artifacts": artifacts}

    with JobLifecycle.create(workspace, record, prefix="pipeline") as life:
        return life.run(pipeline)

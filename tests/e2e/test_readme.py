"""The README runs as written: every ```bash block of its "## Tour" section, in order, in one bash shell, in an
empty folder beside `shared/` (so `../shared/...` resolves as in the README), and each file a step says it writes
is there afterwards; step 10's bucket is moto's S3 server on 127.0.0.1 (AWS_ENDPOINT_URL), as a user's MinIO
would be. The Python example of its "## Architecture" section runs the same way, through the public API."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]


README = Path(__file__).resolve().parents[2] / "README.md"
TOUR_BUCKET = "my-imgtune-bucket"


def tour_section() -> str:
    text = README.read_text()
    start = text.index("\n## Tour\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def tour_steps(section: str) -> list[tuple[str, str, list[str]]]:
    """(title, bash commands, paths it says it writes) per `### ` step of the tour."""
    steps = []
    for chunk in section.split("\n### ")[1:]:
        title, body = chunk.split("\n", 1)
        commands = "\n".join(re.findall(r"```bash\n(.*?)```", body, flags=re.S))
        writes = " ".join(re.findall(r"Writes:(.*?)(?:\n\n|$)", body, flags=re.S))
        paths = [
            token
            for token in re.findall(r"`([^`\s]+)`", writes)
            if token.startswith(("imgtune-runs/", "s3://")) or re.fullmatch(r"[\w-]+\.\w+", token)
        ]
        steps.append((title, commands, paths))
    return steps


def test_the_tour_section_has_a_command_block_and_says_what_it_writes_in_every_step():
    steps = tour_steps(tour_section())
    assert len(steps) >= 9, [title for title, _, _ in steps]
    for title, commands, _ in steps:
        assert commands.strip(), f"tour step {title!r} has no ```bash block"
        assert "Writes:" in tour_section().split(f"### {title}", 1)[1].split("\n### ", 1)[0], title


def test_the_readme_tour_runs_as_written(tmp_path, shared, s3_client: Any):
    s3_client.create_bucket(Bucket=TOUR_BUCKET)
    (tmp_path / "shared").symlink_to(shared)
    work = tmp_path / "work"
    work.mkdir()
    steps = tour_steps(tour_section())
    script = "set -euo pipefail\n" + "".join(
        f"echo '== tour step: {title}'\n{commands}\n" for title, commands, _ in steps
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("IMGTUNE_WORKSPACE")  # the README's commands use the default workspace, ./imgtune-runs
    log = tmp_path / "tour.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", script], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=1200)
        finally:
            with contextlib.suppress(ProcessLookupError):  # an endpoint left in the background by a failed step
                os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text()
    assert code == 0, output[-6000:]

    for title, _, paths in steps:
        for path in paths:
            if path.startswith("s3://"):
                bucket, _, key = path.removeprefix("s3://").partition("/")
                assert s3_client.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0, (title, path)
            else:
                assert list(work.glob(path)), f"tour step {title!r} says it writes {path}, which is not there"

    # What the steps print and write is what they say.
    runs = work / "imgtune-runs"
    assert json.loads((runs / "dogs/job.json").read_text())["status"] == "completed"
    assert len(list(runs.glob("dogs-tune/trials/*/job.json"))) == 4
    best = json.loads((runs / "dogs-tune-best/job.json").read_text())
    assert [e["split"] for e in best["evaluations"]] == ["test"]
    test_photos = sorted((shared / "data/dogs-mini/test").rglob("*.jpg"))
    with (work / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(test_photos) and all(not row.get("error") for row in rows)
    assert '"predictions"' in output  # the curl to /invocations answered
    pipeline = json.loads((runs / "notebook/job.json").read_text())
    assert pipeline["status"] == "completed" and len(pipeline["sample_predictions"]) == 10
    listed = s3_client.get_object(Bucket=TOUR_BUCKET, Key="team/dogs/job.json")["Body"].read()
    assert json.loads(listed)["status"] == "completed"


def test_the_architecture_sections_python_example_runs_as_written(tmp_path, shared):
    text = README.read_text()
    section = text[text.index("\n## Architecture\n") :]
    example = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    (tmp_path / "shared").symlink_to(shared)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "IMGTUNE_WORKSPACE"}
    done = subprocess.run(
        [sys.executable, "-c", example], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert 0.5 < float(lines[0].split()[-1]) <= 1 and 0.5 < float(lines[1].split()[-1]) <= 1
    answers = lines[2:]
    assert len(answers) == 3 and all(line.startswith("../shared/data/dogs-mini/test/") for line in answers)
    jobs = {path.parent.name for path in (work / "imgtune-runs").glob("*/job.json")}
    assert len(jobs) == 3  # the first job, the tuning job (its trials inside it) and the final job

"""train.compile: the compiled module in the Trainer's steps, auto's measure-once-and-remember plan, and the
fallback to eager when compiling fails. torch.compile runs for real, with its `eager` backend (dynamo traces and
runs the graph without generating code: seconds, not minutes); `benchmarks/finetune.py --part compile` compiles
whole jobs with inductor (minutes on a CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgtune.config import build_config
from imgtune.core.errors import ConfigError
from imgtune.models.backends.choose import ChoiceRecord
from imgtune.training.callbacks import Callback
from imgtune.training.compiled import MIN_JOB_SECONDS, CompiledTraining
from imgtune.training.trainer import Trainer

BATCH = 16


def images(n: int = 10 * BATCH + 4) -> TensorDataset:  # 10 full batches and a short one per epoch
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    x = torch.rand(n, 3, 16, 16, generator=g)
    x[labels == 1, 0] += 0.5
    return TensorDataset(x, labels)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
    )


class CompiledSteps:
    """torch.compile with dynamo's eager backend, counting the modules it compiled."""

    def __init__(self, backend="eager"):
        self.backend = backend
        self.compiled: list[nn.Module] = []

    def __call__(self, module: nn.Module) -> nn.Module:
        torch._dynamo.reset()
        compiled = torch.compile(module, backend=self.backend)
        self.compiled.append(compiled)
        return compiled


class ModulePerEpoch(Callback):
    """Which module each training epoch's steps ran (from the Trainer's own attribute)."""

    order = 50

    def __init__(self) -> None:
        self.per_epoch: dict[int, str] = {}
        self.synced: dict[int, bool] = {}  # whether step times waited for the device, per epoch

    def on_batch_end(self, trainer: Trainer) -> None:
        if trainer.phase == "train":
            self.per_epoch[trainer.epoch] = "compiled" if trainer.compiled_module is not None else "eager"
            self.synced[trainer.epoch] = trainer.sync_timing


def train(
    tmp_path: Path, mode: str, epochs: int, compiler: CompiledSteps, min_job_seconds: float = 0.0
) -> tuple[CompiledTraining, ModulePerEpoch]:
    """`min_job_seconds` 0: these jobs of milliseconds count as long enough to try compiling."""
    module = cnn()
    record = ChoiceRecord(tmp_path / "compile.json")
    plan = CompiledTraining(
        module, mode, "the-key", BATCH, record=record, compiler=compiler, min_job_seconds=min_job_seconds
    )
    seen = ModulePerEpoch()
    loaders = {"train": DataLoader(images(), batch_size=BATCH, shuffle=True), "valid": DataLoader(images(40), 16)}
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    trainer = Trainer(module, opt, loaders, epochs=epochs, num_classes=2, callbacks=[plan, seen])
    history = trainer.fit()
    assert len(history) == epochs and not trainer.runner.failures, trainer.runner.failures
    return plan, seen


def test_auto_measures_once_then_follows_the_record(tmp_path):
    compiler = CompiledSteps()
    plan, seen = train(tmp_path, "auto", 5, compiler)
    summary = plan.summary
    assert summary["chosen_by"] == "measurement" and len(compiler.compiled) == 1
    assert summary["eager_step_s"] > 0 and summary["compiled_step_s"] > 0 and summary["compile_s"] > 0
    assert len(plan.times["eager"]) == 10 and len(plan.times["compiled"]) == 10 - 2  # full batches; 2 compile
    chosen = "compiled" if summary["compiled"] else "eager"
    # epoch 1 (one-off costs) is not measured; epoch 2 eager and epoch 3 compiled are
    assert seen.per_epoch == {1: "eager", 2: "eager", 3: "compiled", 4: chosen, 5: chosen}
    assert seen.synced == {1: False, 2: True, 3: True, 4: False, 5: False}  # device times in the measured epochs
    remembered = ChoiceRecord(tmp_path / "compile.json").get("the-key")
    assert remembered["compiled"] == summary["compiled"] and remembered["eager_step_s"] > 0

    again, seen_again = train(tmp_path, "auto", 5, compiler)  # the same kind of job: nothing measured
    assert again.summary["chosen_by"] == "record" and again.times == {"eager": [], "compiled": []}
    assert set(seen_again.per_epoch.values()) == {chosen}


def test_a_remembered_compiled_choice_is_not_followed_by_a_job_too_short_to_pay_it_back(tmp_path):
    ChoiceRecord(tmp_path / "compile.json").put(
        "the-key", {"compiled": True, "eager_step_s": 0.5, "compiled_step_s": 0.3}
    )  # fmt: skip
    compiler = CompiledSteps()
    plan, seen = train(tmp_path, "auto", 2, compiler, min_job_seconds=MIN_JOB_SECONDS)  # 2 x 11 steps x 0.5 s
    assert plan.summary["chosen_by"] == "record" and "too little to pay back" in plan.summary["reason"]
    assert set(seen.per_epoch.values()) == {"eager"} and not compiler.compiled
    plan, seen = train(tmp_path, "auto", 2, compiler)  # long enough (min_job_seconds 0): compiled from the start
    assert plan.summary["compiled"] and set(seen.per_epoch.values()) == {"compiled"}


def test_auto_does_not_measure_a_short_job(tmp_path):
    compiler = CompiledSteps()
    plan, seen = train(tmp_path, "auto", 3, compiler)
    assert plan.summary["chosen_by"] == "too short" and not compiler.compiled
    assert set(seen.per_epoch.values()) == {"eager"}
    assert ChoiceRecord(tmp_path / "compile.json").get("the-key") is None


def test_auto_does_not_compile_where_the_training_left_could_not_pay_it_back(tmp_path):
    """With the default MIN_JOB_SECONDS (20 minutes of training left after the eager epoch), a short job
    measures its eager epoch, then stays eager and records nothing."""
    compiler = CompiledSteps()
    plan, seen = train(tmp_path, "auto", 5, compiler, min_job_seconds=MIN_JOB_SECONDS)
    assert plan.summary["chosen_by"] == "too short" and "too little to pay back" in plan.summary["reason"]
    assert set(seen.per_epoch.values()) == {"eager"} and not compiler.compiled
    assert ChoiceRecord(tmp_path / "compile.json").get("the-key") is None


@pytest.mark.parametrize(("mode", "expected"), [("on", "compiled"), ("off", "eager")])
def test_on_and_off_are_followed(tmp_path, mode, expected):
    compiler = CompiledSteps()
    plan, seen = train(tmp_path, mode, 2, compiler)
    assert plan.summary == {"mode": mode, "chosen_by": "configuration", "compiled": mode == "on"}
    assert set(seen.per_epoch.values()) == {expected} and len(compiler.compiled) == (mode == "on")


def no_compiler(graph_module, example_inputs):
    raise RuntimeError("no C++ compiler found")  # what inductor says on a machine without one, in short


def no_compiler_for_the_backward():
    """A backend whose forward compiles and whose backward (compiled at the first backward) finds no C++
    compiler, as inductor does on a machine without one."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.exc import InvalidCxxCompiler

    def backward_compiler(graph_module, example_inputs):
        raise InvalidCxxCompiler()

    return aot_autograd(fw_compiler=lambda graph_module, example_inputs: graph_module, bw_compiler=backward_compiler)


@pytest.mark.parametrize(
    ("backend", "error"),
    [(no_compiler, "BackendCompilerFailed"), (no_compiler_for_the_backward(), "InvalidCxxCompiler")],
    ids=["forward", "backward"],
)
def test_a_failing_compiler_leaves_training_eager(tmp_path, backend, error):
    plan, seen = train(tmp_path, "auto", 5, CompiledSteps(backend))
    assert plan.summary["chosen_by"] == "failure" and not plan.summary["compiled"]
    assert plan.summary["failed"].startswith(error) and "C++ compiler" in plan.summary["failed"]
    assert set(seen.per_epoch.values()) == {"eager"}  # the failed step itself ran again eager
    assert ChoiceRecord(tmp_path / "compile.json").get("the-key") is None


def test_an_error_of_the_model_itself_is_not_taken_for_a_compile_failure(tmp_path):
    """Only torch.compile's own errors fall back to eager: a compiled model that fails fails the job."""

    class Broken(nn.Module):
        def forward(self, x):
            raise ValueError("the model's own bug")

    module = Broken()
    plan = CompiledTraining(
        module, "on", "k", BATCH, record=ChoiceRecord(tmp_path / "c.json"), compiler=CompiledSteps()
    )
    loaders = {"train": DataLoader(images(), batch_size=BATCH)}
    opt = torch.optim.SGD(cnn().parameters(), lr=0.1)
    trainer = Trainer(module, opt, loaders, epochs=1, num_classes=2, callbacks=[plan])
    with pytest.raises(ValueError, match="own bug"):
        trainer.fit()
    assert trainer.compile_error is None


def test_the_debugger_hooks_going_away_rebuild_the_compiled_module(tmp_path):
    """PoorWeightInitialization's window (3 steps here) hooks the ReLUs; once it is past the debugger removes the
    hooks and the next epoch's compiled module is traced again without them."""
    from debug_harness import blobs, run
    from imgtune.debugger.rules import make_rules

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    compiler = CompiledSteps()
    plan = CompiledTraining(model, "on", "k", 16, record=ChoiceRecord(tmp_path / "c.json"), compiler=compiler)
    rules = make_rules(["PoorWeightInitialization"], {"PoorWeightInitialization": {"steps": 3}})
    result = run(tmp_path, model, blobs(160), None, rules, epochs=3, callbacks=[plan])
    assert len(compiler.compiled) == 2  # epoch 1 with the hooks, epoch 2 without; epoch 3 as epoch 2
    assert result.trial.tensor("1_relu_input").steps("train") == [0, 1, 2]


@pytest.mark.parametrize(("given", "expected"), [("on", "on"), ("off", "off"), ("auto", "auto")])
def test_compile_reads_yaml_on_and_off_as_words(given, expected, tmp_path):
    import yaml  # --set values and config files are YAML: on and off read as booleans

    config = build_config({"data": {"path": str(tmp_path)}, "train": {"compile": yaml.safe_load(given)}})
    assert config.train.compile == expected


def test_compile_on_with_data_parallel_workers_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="compile"):
        build_config({"data": {"path": str(tmp_path)}, "train": {"compile": "on", "workers": 2, "batch_size": 32}})

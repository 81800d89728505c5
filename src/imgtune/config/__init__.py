"""Validated configuration: pydantic models for jobs (and, in their modules, tuning, serving and the pipeline).
Every default lives here; the CLI takes its defaults and help from these models."""

from imgtune.config.job import (
    COLLECTIONS,
    DEFAULT_RULES,
    MAX_IMAGE_PIXELS,
    PROFILER_RULES,
    DataConfig,
    DebuggerConfig,
    EarlyStoppingConfig,
    JobConfig,
    ModelConfig,
    ProfilerConfig,
    SaveConfig,
    TrainConfig,
    apply_overrides,
    build_config,
    load_config_file,
    merge,
)
from imgtune.config.options import (
    OBJECTIVE_MODES,
    Options,
    PipelineOptions,
    ServeOptions,
    TuneOptions,
    config_error,
)

__all__ = [
    "COLLECTIONS",
    "DEFAULT_RULES",
    "MAX_IMAGE_PIXELS",
    "PROFILER_RULES",
    "DataConfig",
    "DebuggerConfig",
    "EarlyStoppingConfig",
    "JobConfig",
    "ModelConfig",
    "ProfilerConfig",
    "SaveConfig",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "load_config_file",
    "merge",
    "OBJECTIVE_MODES",
    "Options",
    "PipelineOptions",
    "ServeOptions",
    "TuneOptions",
    "config_error",
]

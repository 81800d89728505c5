"""Hyperparameter tuning jobs on Ray Tune (imgtune.tuning.job) over search spaces (imgtune.tuning.space).

Ray decides at import time whether it may form multi-node clusters; when it may, even an in-process Ray on
one machine announces and dials the machine's interface address. imgtune keeps Ray on loopback unless a
tuning job names a cluster elsewhere: `use_ray_address()` must run before Ray is imported (the CLI does it;
importing this package does it for an in-process Ray).
"""

from __future__ import annotations

import os
import sys

RAY_CLUSTERS_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(address: str | None) -> bool:
    """True for no address (in-process Ray) and for a cluster on 127.0.0.0/8 or localhost."""
    if not address:
        return True
    host = address.removeprefix("ray://").rsplit(":", 1)[0]
    return host == "localhost" or host.startswith("127.")


def use_ray_address(address: str | None) -> None:
    """Before Ray is imported: loopback only (in-process, or a one-node cluster on 127.0.0.1), or, for a
    cluster elsewhere, Ray's multi-node networking. Without an address, a setting already made stands."""
    if "ray" in sys.modules:  # too late to change; run_tuning_job says so if it matters
        return
    wanted = "0" if is_loopback(address) else "1"
    if address:
        os.environ[RAY_CLUSTERS_ENV] = wanted
    else:
        os.environ.setdefault(RAY_CLUSTERS_ENV, wanted)


use_ray_address(None)

"""Hyperparameter tuning jobs on Ray Tune (imgtune.tuning.job) over search spaces (imgtune.tuning.space).

Ray decides at import time whether it may form multi-node clusters; when it may, even an in-process Ray on
one machine announces and dials the machine's interface address. imgtune keeps Ray on loopback unless a
tuning job names a cluster elsewhere: `use_ray_address()` must run before Ray is imported (the CLI does it;
importing this package does it for an in-process Ray).

Ray also reads its authentication mode when it is imported. A new local cluster (an in-process Ray) gets token
authentication by default, and Ray says so on stderr every time unless RAY_AUTH_MODE is set; imgtune sets it to
that same default, `token`, for an in-process Ray, so that it starts quietly (Ray still makes its token,
~/.ray/auth_token, if there is none). A cluster address keeps the user's own setting: the mode imgtune set is
taken back.
"""

from __future__ import annotations

import os
import sys

RAY_CLUSTERS_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"
_auth_mode_set_here = False  # RAY_AUTH_MODE is imgtune's (for an in-process Ray), not the user's


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
    global _auth_mode_set_here
    wanted = "0" if is_loopback(address) else "1"
    if address:
        os.environ[RAY_CLUSTERS_ENV] = wanted
        if _auth_mode_set_here:  # the cluster's auth is the user's: RAY_AUTH_MODE, a token, ~/.ray/auth_token
            os.environ.pop(RAY_AUTH_MODE_ENV, None)
            _auth_mode_set_here = False
    else:
        os.environ.setdefault(RAY_CLUSTERS_ENV, wanted)
        if RAY_AUTH_MODE_ENV not in os.environ:  # Ray's own default for a new local cluster, said explicitly
            os.environ[RAY_AUTH_MODE_ENV] = "token"
            _auth_mode_set_here = True


use_ray_address(None)

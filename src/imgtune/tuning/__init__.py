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

import logging
import os
import sys
from typing import Any

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


GLOO_SETUP_HOOK = "imgtune.tuning.use_the_nodes_interface_for_gloo"  # every Ray worker process of imgtune's Ray job


def gloo_interface(address: str) -> dict[str, str]:
    """GLOO_SOCKET_IFNAME for ranks that reach each other at `address` (their node's IP): the network interface
    that holds it, unless the environment names one already. Without it gloo picks the interface the host name
    resolves to, which may be one the other ranks cannot reach (loopback on a cluster's node, the machine's
    network address on a loopback Ray)."""
    import socket

    import psutil

    if "GLOO_SOCKET_IFNAME" in os.environ:
        return {}
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addresses):
            return {"GLOO_SOCKET_IFNAME": name}
    return {}


def use_the_nodes_interface_for_gloo() -> None:
    """Ray's worker process setup hook (GLOO_SETUP_HOOK, set when imgtune starts or joins Ray): gloo, which Ray
    Train's data-parallel workers use on CPUs, on the interface of the address Ray gives this node, which every
    other node of the cluster reaches."""
    import contextlib

    import ray

    with contextlib.suppress(Exception):  # a hook that raises fails the worker; gloo then keeps its own choice
        os.environ.update(gloo_interface(ray.util.get_node_ip_address()))


def connect(address: str | None) -> list[dict[str, Any]]:
    """Start an in-process Ray (no address) or join the cluster at `address`, once per process: tuning jobs,
    data-parallel training and serving replicas all come through here. Returns the live nodes (address, CPUs,
    GPUs)."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no experiment tables: imgtune shows its own progress
    for name in ("ray", "ray.tune", "ray.train", "ray.serve"):  # where results are, hints: imgtune says its own
        logging.getLogger(name).setLevel(logging.WARNING)
    if not ray.is_initialized():
        _ray_init(address)
    return [
        {
            "address": n["NodeManagerAddress"],
            "cpus": n.get("Resources", {}).get("CPU", 0),
            "gpus": n.get("Resources", {}).get("GPU", 0),
        }
        for n in ray.nodes()
        if n.get("Alive")
    ]


def _ray_init(address: str | None) -> None:
    import ray

    from imgtune.core.errors import ConfigError, JobError

    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    kwargs["runtime_env"] = {"worker_process_setup_hook": GLOO_SETUP_HOOK}  # data-parallel ranks find each other
    if not address:
        ray.init(num_cpus=os.cpu_count(), num_gpus=None, **kwargs)
        return
    from ray._private import ray_constants

    if not is_loopback(address) and not ray_constants.ENABLE_RAY_CLUSTER:
        raise ConfigError(
            f"Ray was imported for loopback use only, so it cannot join the cluster at {address}",
            f"call imgtune.tuning.use_ray_address({address!r}) before importing Ray (the CLI does), or set "
            f"{RAY_CLUSTERS_ENV}=1",
        )
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise JobError(
            f"could not connect to the Ray cluster at {address}: {_connection_failure(exc)}",
            f"check it is up (`ray status --address {address}`); a cluster with token authentication needs its "
            "token here too: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or ~/.ray/auth_token)",
        ) from exc


def _connection_failure(exc: BaseException) -> str:
    """Why ray.init could not connect, in a line (Ray wraps the reason, as text, in two other exceptions)."""
    chain = []
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = "\n".join(str(e) for e in chain)
    if "InvalidAuthToken" in text or "AuthenticationError" in text:
        return "it refused this driver's authentication token (missing or not the cluster's)"
    return (str(chain[-1]).strip() or type(chain[-1]).__name__).splitlines()[0]

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

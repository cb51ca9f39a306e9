"""Free TCP ports for a server launched on this node, chosen outside the ephemeral range.

With DP attention SGLang derives its ZMQ ports from `--port` (port + 233 up to
port + 240, `PortArgs.init_new`) and gives up after waiting 30 s for any of them.
A `--port` taken with bind(0) lies in the kernel's ephemeral range (32768-60999 by
default), and so do the derived ports: any outbound connection on the node (a gloo
pair of another server, an HTTP client) may be holding one, and the launch fails.
Ports below the ephemeral range are only ever taken by explicit binds, so a port
found free there, with every port derived from it, stays free until the server
binds it. SGLang itself draws its nccl port from 22000-29999 the same way; the
server ports here come from just above that, so the two never meet.
"""

from __future__ import annotations

import random
import socket

ZMQ_TCP_PORT_DELTA = 233  # sglang.srt.server_args.ZMQ_TCP_PORT_DELTA
DERIVED_SPAN = 16  # port_base .. port_base + 6 + a slot per DP rank, with room to spare
SERVER_PORT_LOW = 30000
_DEFAULT_EPHEMERAL_LOW = 32768


def ephemeral_low() -> int:
    """First port of the kernel's ephemeral range (bind(0) and connect() draw from it)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_LOW


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _bind_any() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_server_port(attempts: int = 200) -> int:
    """A free `--port` for an SGLang server whose derived DP-attention ports are free too,
    all of them below the ephemeral range."""
    high = ephemeral_low() - 1 - ZMQ_TCP_PORT_DELTA - DERIVED_SPAN
    low = min(SERVER_PORT_LOW, high - attempts)
    if low < 1024:  # an unusual ip_local_port_range: settle for bind(0)
        return _bind_any()
    for port in random.sample(range(low, high + 1), min(attempts, high - low + 1)):
        derived = range(port + ZMQ_TCP_PORT_DELTA, port + ZMQ_TCP_PORT_DELTA + DERIVED_SPAN)
        if port_is_free(port) and all(port_is_free(p) for p in derived):
            return port
    return _bind_any()


def free_rendezvous_port() -> int:
    """A free port for a rendezvous that a child binds later (the stand-in's gloo store)."""
    from sglang.srt.utils.network import get_free_port_below_ephemeral

    return get_free_port_below_ephemeral()

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


def free_server_port(attempts: int = 200) -> int:
    """A free `--port` for an SGLang server whose derived DP-attention ports are free too,
    all of them below the ephemeral range (free as SGLang's own launch check sees it)."""
    from sglang.srt.utils.network import get_free_port, is_port_available

    high = ephemeral_low() - 1 - ZMQ_TCP_PORT_DELTA - DERIVED_SPAN
    low = min(SERVER_PORT_LOW, high - attempts)
    if low < 1024:  # an unusual ip_local_port_range: settle for bind(0)
        return get_free_port()
    for port in random.sample(range(low, high + 1), min(attempts, high - low + 1)):
        derived = range(port + ZMQ_TCP_PORT_DELTA, port + ZMQ_TCP_PORT_DELTA + DERIVED_SPAN)
        if is_port_available(port) and all(is_port_available(p) for p in derived):
            return port
    return get_free_port()


def free_rendezvous_port() -> int:
    """A free port for a rendezvous that a child binds later (the stand-in's gloo store)."""
    from sglang.srt.utils.network import get_free_port_below_ephemeral

    return get_free_port_below_ephemeral()

"""Server ports are drawn below the kernel's ephemeral range, with SGLang's derived ports free."""

from __future__ import annotations

import socket

from sglang.srt.utils.network import is_port_available

from sglang_ext.plugin import ports


def test_server_port_and_its_derived_ports_are_free_and_below_the_ephemeral_range():
    port = ports.free_server_port()
    derived = range(port + ports.ZMQ_TCP_PORT_DELTA, port + ports.ZMQ_TCP_PORT_DELTA + ports.DERIVED_SPAN)
    assert max(derived) < ports.ephemeral_low()
    assert is_port_available(port) and all(is_port_available(p) for p in derived)


def test_a_port_whose_derived_port_is_taken_is_skipped(monkeypatch):
    first = ports.free_server_port()
    second = ports.free_server_port()
    while abs(second - first) <= ports.DERIVED_SPAN:  # keep the held port out of second's derived range
        second = ports.free_server_port()
    with socket.socket() as held:  # a listener on the metrics port SGLang would derive from `first`
        held.bind(("127.0.0.1", first + ports.ZMQ_TCP_PORT_DELTA + 4))
        held.listen()
        assert not is_port_available(first + ports.ZMQ_TCP_PORT_DELTA + 4)
        monkeypatch.setattr(ports.random, "sample", lambda population, k: [first, second])
        assert ports.free_server_port() == second


def test_rendezvous_port_is_below_the_ephemeral_range():
    assert ports.free_rendezvous_port() < ports.ephemeral_low()

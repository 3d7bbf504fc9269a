"""Free loopback ports for the servers a test starts, from that test file's own range."""

from __future__ import annotations

import socket

import pytest


def free_ports(port_range: range, n: int = 1) -> list[int]:
    """`n` ports of `port_range` that 127.0.0.1 can bind now; fails the test when there are fewer."""
    ports = []
    for port in port_range:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    pytest.fail(f"need {n} free port(s) in {port_range.start}-{port_range.stop - 1} on 127.0.0.1")

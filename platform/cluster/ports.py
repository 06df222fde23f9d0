"""The one way memlayers picks a free TCP port and its loopback interface (servers and process groups of
a local session bind loopback)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Optional

import psutil

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def loopback_interface() -> Optional[str]:
    """The name of the interface that holds 127.0.0.1 (`lo` on Linux, `lo0` on macOS), or None: gloo binds
    the interface named by GLOO_SOCKET_IFNAME, otherwise the address this host's name resolves to."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(address.family == socket.AF_INET and address.address == LOOPBACK for address in addresses):
            return name
    return None


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) is this machine's loopback, IPv4-mapped IPv6 included."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a name: it may resolve to any interface
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)

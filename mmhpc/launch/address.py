"""Which address of this node the other nodes reach it at (ZeroMQ, NIXL/UCX, torch.distributed).

`cluster.interface` picks the network: an interface name (`ib0`, `hsn0`, `eth0`; several,
comma-separated, the first present wins) or an IPv4 network in CIDR form (`10.213.0.0/16`:
the first of this node's addresses inside it). Empty: the address the node's name resolves to,
unless loopback, else the interface of the default route. Every node resolves its own; rank 0
prints each node's choice at start-up (and `--dry-run` under a launcher). Ports are never
found here: each socket binds where it listens and its address travels in the MPI exchange.
"""
from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass

_SIOCGIFADDR = 0x8915


class AddressError(ValueError):
    """No address matches `cluster.interface`; one line listing what this node has."""


@dataclass(frozen=True)
class NodeAddress:
    addr: str
    interface: str          # "" when not known (a name that resolved, loopback)
    how: str                # why this one: "cluster.interface=ib0", "hostname", ...

    def __str__(self) -> str:
        dev = f" on {self.interface}" if self.interface else ""
        return f"{self.addr}{dev} ({self.how})"


def interfaces() -> dict[str, str]:
    """This node's IPv4 interfaces that are up with an address: name -> address."""
    out: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                out[name] = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
            except OSError:           # no IPv4 address (or down)
                continue
    return out


def node_address(interface: str = "", hostname: str | None = None,
                 single_node: bool = False) -> NodeAddress:
    """This node's address for `interface` (see the module doc). `single_node`: loopback."""
    spec = interface.strip()
    if spec:
        have = interfaces()
        if "/" in spec:
            try:
                net = ipaddress.ip_network(spec, strict=False)
            except ValueError as e:
                raise AddressError(f"cluster.interface={spec!r} is neither an interface name "
                                   f"nor a CIDR network: {e}") from None
            for name, addr in have.items():
                if ipaddress.ip_address(addr) in net:
                    return NodeAddress(addr, name, f"cluster.interface={spec}")
        else:
            for name in (n.strip() for n in spec.split(",")):
                if name in have:
                    return NodeAddress(have[name], name, f"cluster.interface={spec}")
        listed = ", ".join(f"{n}={a}" for n, a in have.items()) or "none"
        raise AddressError(f"no address for cluster.interface={spec} on node "
                           f"{hostname or socket.gethostname()} (its interfaces: {listed})")
    if single_node:
        return NodeAddress("127.0.0.1", "lo", "one node")
    host = hostname or socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
        if not addr.startswith("127."):
            return NodeAddress(addr, _name_of(addr), f"hostname {host}")
    except OSError:
        pass
    try:   # the interface of the default route; connect() on UDP sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
        return NodeAddress(addr, _name_of(addr), "default route")
    except OSError:
        raise AddressError(f"node {host} has no address other nodes can reach (no "
                           f"non-loopback name, no default route): set cluster.interface") from None


def _name_of(addr: str) -> str:
    return next((n for n, a in interfaces().items() if a == addr), "")

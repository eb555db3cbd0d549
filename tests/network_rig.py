"""Hosts in Linux network namespaces: a public network, and homes behind NAT routers with a stateful firewall.

Every address lies in 198.18.0.0/15 (RFC 2544's benchmarking range) inside namespaces this rig creates,
and nothing is routed out of them. The rig removes its namespaces when it closes, also after a failure,
and a new rig first removes what a killed run left behind (names carry PREFIX and the pid of the
process that made them; those of a live process are left alone).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from swarm.lifetime import is_alive

PREFIX = "swr"  # names of namespaces made here: swr<pid>-<host>
WAN = "198.18.0"  # the public network: 198.18.0.0/24, one bridge
HOME = "198.19"  # home N's network: 198.19.N.0/24, its router at .1 and its host at .2


class RigUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, not Linux, no iproute2/iptables): tests skip with this reason."""


@dataclass(frozen=True)
class Host:
    name: str  # the namespace
    address: str  # its own address
    public: bool  # reachable from the public network without a NAT in between

    def command(self, *argv: str) -> list[str]:
        """ARGV run inside this host's namespace."""
        return ["ip", "netns", "exec", self.name, *argv]


def why_unavailable() -> str | None:
    if not os.uname().sysname == "Linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing: apt-get install iproute2 iptables"
    return None


def _sh(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RigUnavailable(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")


def remove_leftovers() -> None:
    """Namespaces of runs that died before closing their rig (their links go with them)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.strip() else ""
        owner = name.removeprefix(PREFIX).split("-", 1)[0]
        if name.startswith(PREFIX) and owner.isdigit() and not is_alive(int(owner)):
            _kill_inside(name)
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)



def _kill_inside(namespace: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


class NetworkRig:
    """A public network (a bridge in namespace `wan`) with public hosts on it and homes behind NAT routers.

    A home router masquerades its home's traffic out and lets back in only what belongs to a
    connection opened from inside (conntrack's ESTABLISHED/RELATED); the rest is dropped.
    """

    _made = 0  # rigs made by this process: each gets names of its own

    def __init__(self) -> None:
        reason = why_unavailable()
        if reason:
            raise RigUnavailable(reason)
        remove_leftovers()
        NetworkRig._made += 1
        self.run = f"{os.getpid()}-{NetworkRig._made}"
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self._next_public, self._next_home = 10, 1
        try:
            self.wan = self._namespace("wan")
            _sh("ip", "-n", self.wan, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", self.wan, "link", "set", "br0", "up")
            _sh("ip", "-n", self.wan, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def _namespace(self, role: str) -> str:
        name = f"{PREFIX}{self.run}-{role}"
        _sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        _sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def _wire(self, inside: str, inner_name: str, outside: str, outer_name: str) -> None:
        """A veth pair: INNER_NAME in namespace INSIDE, OUTER_NAME in OUTSIDE."""
        _sh("ip", "link", "add", "tmp-in", "netns", inside, "type", "veth", "peer", "name", "tmp-out", "netns", outside)
        _sh("ip", "-n", inside, "link", "set", "tmp-in", "name", inner_name)
        _sh("ip", "-n", outside, "link", "set", "tmp-out", "name", outer_name)
        _sh("ip", "-n", inside, "link", "set", inner_name, "up")
        _sh("ip", "-n", outside, "link", "set", outer_name, "up")

    def public_host(self, name: str) -> Host:
        """A host with an address on the public network."""
        ns, address = self._namespace(name), f"{WAN}.{self._next_public}"
        self._next_public += 1
        self._wire(ns, "eth0", self.wan, f"p-{name}"[:15])
        _sh("ip", "-n", self.wan, "link", "set", f"p-{name}"[:15], "master", "br0")
        _sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        host = Host(ns, address, public=True)
        self.hosts[name] = host
        return host

    def home_host(self, name: str) -> Host:
        """A host behind its own NAT router; the router's public address is taken from the public range."""
        n = self._next_home
        self._next_home += 1
        router, ns = self._namespace(f"{name}-nat"), self._namespace(name)
        wan_address, lan = f"{WAN}.{200 + n}", f"{HOME}.{n}"
        self._wire(router, "wan0", self.wan, f"r-{name}"[:15])
        _sh("ip", "-n", self.wan, "link", "set", f"r-{name}"[:15], "master", "br0")
        _sh("ip", "-n", router, "addr", "add", f"{wan_address}/24", "dev", "wan0")
        self._wire(ns, "eth0", router, "lan0")
        _sh("ip", "-n", router, "addr", "add", f"{lan}.1/24", "dev", "lan0")
        _sh("ip", "-n", ns, "addr", "add", f"{lan}.2/24", "dev", "eth0")
        _sh("ip", "-n", ns, "route", "add", "default", "via", f"{lan}.1")
        _sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        nat = ["ip", "netns", "exec", router, "iptables"]
        _sh(*nat, "-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-j", "MASQUERADE")
        _sh(*nat, "-P", "FORWARD", "DROP")
        _sh(*nat, "-A", "FORWARD", "-i", "lan0", "-o", "wan0", "-j", "ACCEPT")
        _sh(*nat, "-A", "FORWARD", "-m", "state", "--state", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        _sh(*nat, "-P", "INPUT", "DROP")  # the router itself answers nobody from outside either
        _sh(*nat, "-A", "INPUT", "-i", "lan0", "-j", "ACCEPT")
        _sh(*nat, "-A", "INPUT", "-m", "state", "--state", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        host = Host(ns, f"{lan}.2", public=False)
        self.hosts[name] = host
        return host

    def close(self) -> None:
        for name in reversed(self.namespaces):
            _kill_inside(name)
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        self.namespaces.clear()

    def __enter__(self) -> "NetworkRig":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Network namespaces for tests: a "hub" and workers behind a NAT router, built with ``ip netns``,
``ip link ... type veth`` and ``iptables -t nat ... MASQUERADE`` (root only; :func:`preflight`
says why not when it cannot be done here).

    hub (HUB_IP) --wan-- router --siteI-- worker I (10.232.I.2, default route via the router)

The router forwards and masquerades the sites' traffic to the hub's subnet and drops every new
connection (TCP SYN, ICMP echo) from the hub's side into a site; the hub has no route to any site
subnet at all. A worker can therefore dial the hub, and nothing on the hub can dial a worker: the
situation of a client behind a home or corporate NAT. Every address lives inside the namespaces
(nothing is added to the host's own network), and the names carry the creating process's id, so
two runs on one machine do not collide. :meth:`Topology.destroy` removes everything (also after a
half-built topology)."""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

WAN_NET = "10.231.0"  # the hub's side: router .1, hub .2
SITE_NET = "10.232"  # site I: 10.232.I.0/24, router .1, worker .2
HUB_IP = f"{WAN_NET}.2"
ROUTER_WAN_IP = f"{WAN_NET}.1"
CLONE_NEWNET = 0x40000000
_IPTABLES = ("iptables", "iptables-nft", "iptables-legacy")


class NetnsUnavailable(RuntimeError):
    """Namespaces, veth pairs or NAT cannot be made here (not root, no ip/iptables, no kernel support)."""


def _run(argv: Sequence[str], timeout: float = 15, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exited with {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def netns_exec(ns: str, *argv: str) -> list[str]:
    """The argv that runs ``argv`` inside namespace ``ns`` (``ip netns exec`` execs, no extra process)."""
    return ["ip", "netns", "exec", ns, *argv]


def preflight(tag: str) -> str:
    """The iptables command that does NAT inside a namespace here; NetnsUnavailable (the reason)
    when namespaces, veth pairs or NAT cannot be made."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (ip netns add, iptables)")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("no `ip` command (iproute2)")
    candidates = [c for c in _IPTABLES if shutil.which(c)]
    if not candidates:
        raise NetnsUnavailable("no iptables command (apt-get install iptables)")
    ns = f"{tag}-probe"
    try:
        add = _run(["ip", "netns", "add", ns], check=False)
        if add.returncode != 0:
            raise NetnsUnavailable(f"`ip netns add` is not allowed here: {add.stderr.strip()}")
        veth = _run(["ip", "-n", ns, "link", "add", "pa", "type", "veth", "peer", "name", "pb"], check=False)
        if veth.returncode != 0:
            raise NetnsUnavailable(f"cannot make a veth pair: {veth.stderr.strip()}")
        errors = []
        for ipt in candidates:
            listed = _run(netns_exec(ns, ipt, "-t", "nat", "-L", "-n"), check=False)
            nat = _run(netns_exec(ns, ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "pa", "-j", "MASQUERADE"),
                       check=False)
            if listed.returncode == 0 and nat.returncode == 0:
                return ipt
            errors.append(f"{ipt}: {(listed.stderr or nat.stderr).strip()}")
        raise NetnsUnavailable("iptables cannot do NAT in a namespace here (" + "; ".join(errors) + ")")
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsUnavailable(f"namespace probe failed: {e}") from None
    finally:
        _run(["ip", "netns", "del", ns], check=False)


@dataclass
class Topology:
    tag: str
    iptables: str
    workers: tuple[str, ...]
    hub: str = ""
    router: str = ""
    sites: dict[str, str] = field(default_factory=dict)  # worker name -> its namespace
    worker_ips: dict[str, str] = field(default_factory=dict)
    made: list[str] = field(default_factory=list)  # namespaces created, in order

    @property
    def hub_ip(self) -> str:
        return HUB_IP

    def namespaces(self) -> list[str]:
        return list(self.made)

    def sh(self, ns: str, *argv: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
        return _run(netns_exec(ns, *argv), timeout=timeout, check=check)

    def _add_ns(self, name: str) -> str:
        _run(["ip", "netns", "add", name])
        self.made.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def build(self) -> Topology:
        self.hub = self._add_ns(f"{self.tag}-hub")
        self.router = self._add_ns(f"{self.tag}-rt")
        rt, ipt = self.router, self.iptables
        # the hub's link to the router: the hub knows its own /24 and nothing else (no default route)
        _run(["ip", "-n", rt, "link", "add", "wan", "type", "veth", "peer", "name", "eth0", "netns", self.hub])
        _run(["ip", "-n", rt, "addr", "add", f"{ROUTER_WAN_IP}/24", "dev", "wan"])
        _run(["ip", "-n", self.hub, "addr", "add", f"{HUB_IP}/24", "dev", "eth0"])
        _run(["ip", "-n", rt, "link", "set", "wan", "up"])
        _run(["ip", "-n", self.hub, "link", "set", "eth0", "up"])
        for i, worker in enumerate(self.workers):
            ns = self._add_ns(f"{self.tag}-w{i}")
            self.sites[worker] = ns
            self.worker_ips[worker] = f"{SITE_NET}.{i}.2"
            dev = f"site{i}"
            _run(["ip", "-n", rt, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "-n", rt, "addr", "add", f"{SITE_NET}.{i}.1/24", "dev", dev])
            _run(["ip", "-n", ns, "addr", "add", f"{SITE_NET}.{i}.2/24", "dev", "eth0"])
            _run(["ip", "-n", rt, "link", "set", dev, "up"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", ns, "route", "add", "default", "via", f"{SITE_NET}.{i}.1"])
        # the router: forwards, masquerades the sites behind its wan address, and refuses new
        # connections from the wan side into a site (as a NAT gateway does without port forwards)
        self.sh(rt, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
        self.sh(rt, ipt, "-t", "nat", "-A", "POSTROUTING", "-s", f"{SITE_NET}.0.0/16", "-o", "wan", "-j", "MASQUERADE")
        self.sh(rt, ipt, "-A", "FORWARD", "-i", "wan", "-p", "tcp", "--syn", "-j", "DROP")
        self.sh(rt, ipt, "-A", "FORWARD", "-i", "wan", "-p", "icmp", "--icmp-type", "echo-request", "-j", "DROP")
        return self

    def destroy(self) -> list[str]:
        """Kill what still runs in the namespaces (only this topology's: the names are unique) and
        delete them (their veth pairs go with them). Returns the errors, if any."""
        errors = []
        for ns in reversed(self.made):
            with contextlib.suppress(Exception):
                pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
            for _ in range(20):
                proc = _run(["ip", "netns", "del", ns], check=False)
                if proc.returncode == 0:
                    break
                time.sleep(0.1)
            else:
                errors.append(f"{ns}: {proc.stderr.strip()}")
        self.made.clear()
        return errors


def build(tag: str, iptables: str, workers: Sequence[str]) -> Topology:
    """Make the topology; on any error what was made is removed again before raising."""
    topo = Topology(tag, iptables, tuple(workers))
    try:
        return topo.build()
    except BaseException:
        topo.destroy()
        raise


_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the body with this *thread* in network namespace ``ns``: sockets it opens and processes
    it forks live there. Used to start a helper that the test process itself must reach (Redis,
    whose start-up check connects to it)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back: {os.strerror(err)}")
    finally:
        os.close(target)
        os.close(own)


def _decode(hex_addr: str) -> tuple[str, int]:
    """``0200E70A:1B58`` (or its 32-hex-digit IPv6 form) from /proc/net/tcp* as ``("10.231.0.2", 7000)``;
    an IPv4-mapped IPv6 address (gRPC's dual-stack sockets) as its IPv4 address."""
    addr, port = hex_addr.split(":")
    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))  # host-order words
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


@dataclass(frozen=True)
class Socket:
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str  # /proc/net/tcp's hex state: 0A is LISTEN, 01 ESTABLISHED
    inode: str = ""

    @property
    def listening(self) -> bool:
        return self.state == "0A"

    @property
    def established(self) -> bool:
        return self.state == "01"


def tcp_sockets(pid: int) -> list[Socket]:
    """Every TCP socket (IPv4 and IPv6) in ``pid``'s network namespace, from /proc/PID/net/tcp and
    tcp6; empty once the process is gone."""
    rows = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9:
                rows.append(Socket(_decode(parts[1]), _decode(parts[2]), parts[3], parts[9]))
    return rows


def owned_sockets(pid: int) -> list[Socket]:
    """The TCP sockets process ``pid`` itself holds (its descriptors, /proc/PID/fd), not every
    socket of its namespace: right after ``ip netns exec`` starts, the process is briefly still in
    the host's namespace, whose other processes' sockets are not its own."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return [sock for sock in tcp_sockets(pid) if sock.inode in inodes]

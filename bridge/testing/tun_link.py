"""A userspace network emulator: two network namespaces joined by an impaired TUN link.

Theory of operation
===================

This kernel has no netem, but it has TUN devices and network namespaces. A
:class:`TunLab` makes two namespaces, ``a`` and ``b`` (unique names per run), and
:func:`open_link` gives each a TUN device: opened in the root namespace (TUNSETIFF,
``IFF_TUN | IFF_NO_PI``), moved into its namespace, addressed :data:`ADDRESS_A` /
:data:`ADDRESS_B` (``/32``) with a route to the other's ``/24`` over it. Every IP
packet one namespace sends to the other comes out of its TUN file descriptor; the
driver (:func:`forward`) hands it to the sans-IO core, which decides its fate, and
writes it to the other TUN when it is due. So the only path between the namespaces is
the emulated link, for TCP (handshakes, ACKs, retransmissions) and UDP alike: what a
benchmark measures through it is what a real lossy link would do to both.

**The core** (:class:`TunLinkCore`, one :class:`ImpairedPath` per direction) is plain
code with an explicit ``now``: the decisions are :class:`~bridge.testing.lossy_link.Impairer`'s
(loss, duplication, reordering, one seeded stream per direction, the same decisions
as the UDP relay's), plus a delay of ``delay_ms`` ± ``jitter_ms`` (jitter may reorder,
as netem's does) and a heap of the packets due. It counts every packet that enters
each direction, and its IP bytes (headers included: what the network carries, TCP
ACKs and retransmissions too), in total and per flow (protocol and the port on the
``b`` side, the server side of the benchmarks), and what it dropped and delivered.

**The driver** is a process of its own (the benchmark's ``tun-link`` role,
:mod:`bridge.bench.roles`): it owns the two TUN file descriptors; when it exits they
close and the devices disappear. The namespaces are the :class:`TunLab`'s, which
deletes them on every exit path (its ``with`` block, or :meth:`TunLab.close`).
:func:`unavailable` says in one line why this cannot run (not root, no
``/dev/net/tun``, no ``ip``, no namespaces), for a clean skip.

Test and benchmark tool: the driver does I/O (trio, the TUN fds, ``ip``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import math
import os
import secrets
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType

import msgspec
import trio

from bridge.testing.lossy_link import Impairer, Impairment, direction_impairer

__all__ = [
    "ADDRESS_A",
    "ADDRESS_B",
    "FlowStatistics",
    "ImpairedPath",
    "PathStatistics",
    "TunLab",
    "TunLinkCore",
    "TunLinkStatistics",
    "forward",
    "inside",
    "namespaces_unavailable",
    "open_link",
    "unavailable",
]

ADDRESS_A = "10.77.1.1"
ADDRESS_B = "10.77.2.1"
_SUBNET_A = "10.77.1.0/24"
_SUBNET_B = "10.77.2.0/24"
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_MAX_PACKET = 65535
_PROTOCOLS = {6: "tcp", 17: "udp", 1: "icmp"}


def namespaces_unavailable(who: str = "network namespaces") -> str | None:
    """Why network namespaces cannot be made here (one line naming ``who`` needs them), or None.

    Not root, no ``ip``, or ``ip netns add`` refused (it tries one, with a unique name, and
    deletes it).
    """
    if os.geteuid() != 0:
        return f"{who} need root (run as root, as CI does)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed; run tests/setup-system.sh or apt-get install -y iproute2"
    name = f"srmprobe{os.getpid()}{secrets.token_hex(2)}"
    probe = subprocess.run(["ip", "netns", "add", name], check=False, capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns add` fails here ({probe.stderr.strip()}); network namespaces are not available"
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
    return None


def unavailable() -> str | None:
    """Why a TUN link cannot be set up here (one line), or None."""
    if os.geteuid() == 0 and not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun on this machine: TUN devices are not available"
    return namespaces_unavailable("the TUN link (network namespaces and TUN devices)")


# --------------------------------------------------------------------------- sans-IO core


class FlowStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Packets and IP bytes of one flow in one direction, as they entered the link."""

    packets: int = 0
    bytes: int = 0


class PathStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What one direction carried: packets and IP bytes in, and their fate."""

    packets: int
    bytes: int
    dropped: int
    duplicated: int
    reordered: int
    delivered: int
    delivered_bytes: int
    write_errors: int
    #: By ``"tcp:PORT"`` / ``"udp:PORT"``, PORT being the ``b`` side's port of the flow.
    flows: dict[str, FlowStatistics]


class TunLinkStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Both directions of a :class:`TunLinkCore`."""

    a_to_b: PathStatistics
    b_to_a: PathStatistics


def flow_key(packet: bytes, *, b_port_is_destination: bool) -> str:
    """``"tcp:PORT"`` / ``"udp:PORT"`` of an IPv4 packet (PORT on the ``b`` side), else ``"other"``."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return "other"
    protocol = _PROTOCOLS.get(packet[9])
    header = (packet[0] & 0x0F) * 4
    if protocol not in ("tcp", "udp") or len(packet) < header + 4:
        return protocol or "other"
    source, destination = struct.unpack_from(">HH", packet, header)
    return f"{protocol}:{destination if b_port_is_destination else source}"


@dataclass
class ImpairedPath:
    """One direction of the link, sans-IO: packets in with their ``now``, packets due out."""

    impairer: Impairer
    b_port_is_destination: bool
    reorder_hold: float = 0.05
    packets: int = 0
    bytes: int = 0
    delivered: int = 0
    delivered_bytes: int = 0
    write_errors: int = 0
    flows: dict[str, list[int]] = field(default_factory=dict)
    _due: list[tuple[float, int, bytes | None, int]] = field(default_factory=list)  # (due, order, packet, hold token)
    _order: int = 0

    def admit(self, packet: bytes, now: float) -> None:
        """A packet entered this direction at ``now``: count it, decide its fate, schedule what goes on."""
        self.packets += 1
        self.bytes += len(packet)
        flow = self.flows.setdefault(flow_key(packet, b_port_is_destination=self.b_port_is_destination), [0, 0])
        flow[0] += 1
        flow[1] += len(packet)
        impairer = self.impairer
        held = impairer.holding
        self._schedule(impairer.admit(packet), now)
        token = impairer.holding
        if token is not None and token != held:  # held for reordering: released by the next, or at the hold's end
            self._push(now + self.reorder_hold, None, token)

    def next_due(self) -> float | None:
        """When the next packet (or a reorder hold's end) is due; None: nothing is waiting."""
        return self._due[0][0] if self._due else None

    def take_due(self, now: float) -> list[bytes]:
        """The packets due at ``now``, in order."""
        out: list[bytes] = []
        due = self._due
        while due and due[0][0] <= now:
            _at, _order, packet, token = heapq.heappop(due)
            if packet is None:
                self._schedule(self.impairer.release(token), now)  # the hold ended: it goes now, delayed
                continue
            out.append(packet)
            self.delivered += 1
            self.delivered_bytes += len(packet)
        return out

    def _schedule(self, packets: list[bytes], now: float) -> None:
        for packet in packets:
            self._push(now + self.impairer.delay(), packet, 0)

    def _push(self, at: float, packet: bytes | None, token: int) -> None:
        self._order += 1
        heapq.heappush(self._due, (at, self._order, packet, token))

    def statistics(self) -> PathStatistics:
        counters = self.impairer.counters
        return PathStatistics(
            packets=self.packets,
            bytes=self.bytes,
            dropped=counters.dropped,
            duplicated=counters.duplicated,
            reordered=counters.reordered,
            delivered=self.delivered,
            delivered_bytes=self.delivered_bytes,
            write_errors=self.write_errors,
            flows={key: FlowStatistics(packets=p, bytes=b) for key, (p, b) in sorted(self.flows.items())},
        )


class TunLinkCore:
    """Both directions of the emulated link (``a → b`` and ``b → a``), each with its own impairment and stream."""

    def __init__(
        self,
        a_to_b: Impairment,
        b_to_a: Impairment | None = None,
        *,
        seed: int | str | None = None,
        reorder_hold_ms: float = 50.0,
    ) -> None:
        hold = reorder_hold_ms / 1000.0
        self.a_to_b = ImpairedPath(direction_impairer(a_to_b, seed, "a_to_b"), True, hold)
        self.b_to_a = ImpairedPath(direction_impairer(b_to_a or a_to_b, seed, "b_to_a"), False, hold)

    def next_due(self) -> float | None:
        dues = [t for t in (self.a_to_b.next_due(), self.b_to_a.next_due()) if t is not None]
        return min(dues) if dues else None

    def statistics(self) -> TunLinkStatistics:
        return TunLinkStatistics(a_to_b=self.a_to_b.statistics(), b_to_a=self.b_to_a.statistics())


# --------------------------------------------------------------------------- namespaces and devices


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


class TunLab:
    """Two network namespaces with unique names, deleted on every exit path.

    ``with TunLab() as lab:`` creates :attr:`a` and :attr:`b` (``srmtun-<tag>-a``/``-b``,
    the tag from this process's pid and a random part) with loopback up; the TUN
    devices' names (:attr:`device_a`, :attr:`device_b`) carry the same tag.
    """

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.a = f"srmtun-{tag}-a"
        self.b = f"srmtun-{tag}-b"
        self.device_a = f"srt{tag}a"
        self.device_b = f"srt{tag}b"
        self._created: list[str] = []

    def create(self) -> None:
        try:
            for name in (self.a, self.b):
                _ip("netns", "add", name)
                self._created.append(name)
                _ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Delete the namespaces this lab created (nothing else); safe to call twice."""
        while self._created:
            subprocess.run(["ip", "netns", "del", self._created.pop()], check=False, capture_output=True)

    def exec_prefix(self, side: str) -> list[str]:
        """The command prefix that runs a program inside namespace ``side`` (``"a"`` or ``"b"``)."""
        return ["ip", "netns", "exec", self.a if side == "a" else self.b]

    def __enter__(self) -> TunLab:
        self.create()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Run the calling thread in network namespace ``namespace`` for the block.

    Sockets created in the block belong to that namespace for good (a socket keeps
    the namespace it was made in): a benchmark opens its miners' connections inside
    the miners' namespace and reads them from anywhere. Only this thread moves.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def open_link(namespace_a: str, device_a: str, namespace_b: str, device_b: str) -> tuple[int, int]:
    """TUN devices in the two namespaces, addressed and routed to each other; their fds (a, b).

    Closing the fds removes the devices.
    """
    fds: list[int] = []
    try:
        for namespace, device, address, other in (
            (namespace_a, device_a, ADDRESS_A, _SUBNET_B),
            (namespace_b, device_b, ADDRESS_B, _SUBNET_A),
        ):
            fd = _open_tun(device)
            fds.append(fd)
            _ip("link", "set", device, "netns", namespace)
            # IPv4 only: no IPv6 router solicitations or neighbour discovery on the link.
            _ip("netns", "exec", namespace, "sysctl", "-qw", f"net.ipv6.conf.{device}.disable_ipv6=1")
            _ip("-n", namespace, "addr", "add", f"{address}/32", "dev", device)
            _ip("-n", namespace, "link", "set", device, "up")
            _ip("-n", namespace, "route", "add", other, "dev", device)
            os.set_blocking(fd, False)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds[0], fds[1]


async def forward(core: TunLinkCore, fd_a: int, fd_b: int) -> None:
    """Move packets between the two TUN fds through ``core`` until cancelled (the driver)."""
    wake = trio.Event()

    async def read(fd: int, path: ImpairedPath) -> None:
        nonlocal wake
        while True:
            await trio.lowlevel.wait_readable(fd)
            while True:
                try:
                    packet = os.read(fd, _MAX_PACKET)
                except BlockingIOError:
                    break
                path.admit(packet, trio.current_time())
            wake.set()

    async def write() -> None:
        nonlocal wake
        while True:
            now = trio.current_time()
            for path, fd in ((core.a_to_b, fd_b), (core.b_to_a, fd_a)):
                for packet in path.take_due(now):
                    try:
                        os.write(fd, packet)
                    except OSError:
                        path.write_errors += 1
            due = core.next_due()
            with trio.move_on_at(math.inf if due is None else due):
                await wake.wait()
            if wake.is_set():
                wake = trio.Event()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, fd_a, core.a_to_b)
        nursery.start_soon(read, fd_b, core.b_to_a)
        nursery.start_soon(write)

"""What the transport benchmarks measure with, straight from the kernel: bytes and
packets of TCP connections, CPU time of processes, and percentiles.

**TCP.** Linux keeps per-connection counters in ``struct tcp_info``
(include/uapi/linux/tcp.h): ``tcpi_bytes_sent`` (payload bytes handed to IP,
retransmissions included), ``tcpi_bytes_received``, ``tcpi_segs_out`` and
``tcpi_segs_in`` (every segment, pure ACKs, SYN and FIN included). A process reads
them for its own sockets with ``getsockopt(TCP_INFO)``; the benchmarks read them for
*any* socket on the host through the ``NETLINK_SOCK_DIAG`` interface (what ``ss -ti``
uses), so the connections inside the proxy, the sidecar and the pool processes are
measured without touching those programs. A connection is identified by its local
and remote port; the benchmark picks the server end of each link (the pool's or the
sidecar's listening port) and takes differences between two snapshots, so the TCP and
TLS handshakes before the window are not counted.

**On the wire.** Payload bytes plus, per packet, the IPv4 header (20 bytes) and the
TCP header (20 bytes, plus 12 for the timestamp option when the connection uses it,
as Linux does by default) or the UDP header (8 bytes). Ethernet framing is not
included. On loopback the MSS is ~64 KiB, so a write larger than an Ethernet MSS
(1448 bytes) is one segment here and would be several on the internet; only job
lines are ever that long.

**UDP drops.** ``RcvbufErrors`` of /proc/net/snmp counts datagrams the kernel
dropped because the receiving socket's buffer was full (host-wide).

**CPU.** The time a process spent on a CPU, in nanoseconds, summed over its threads
from ``/proc/<pid>/task/<tid>/schedstat`` (falls back to ``utime + stime`` of
``/proc/<pid>/stat``, 10 ms resolution, where schedstat is missing).
"""

from __future__ import annotations

import math
import os
import socket
import struct
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

IPV4_HEADER = 20
TCP_HEADER = 20
TCP_TIMESTAMP_OPTION = 12
UDP_HEADER = 8

# netlink / sock_diag (include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h)
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_INET_DIAG_INFO = 2
_TCP_ESTABLISHED = 1
_NLMSG_HEADER = struct.Struct("=IHHII")
_INET_DIAG_REQ_V2 = struct.Struct("=BBBBI48x")  # family, protocol, ext, pad, states, inet_diag_sockid
_INET_DIAG_MSG_SIZE = 72
_RTATTR = struct.Struct("=HH")
# struct tcp_info offsets
_TCPI_OPTIONS = 5
_TCPI_OPT_TIMESTAMPS = 0x1
_TCPI_BYTES_ACKED = 120
_TCPI_BYTES_RECEIVED = 128
_TCPI_SEGS_OUT = 136
_TCPI_SEGS_IN = 140
_TCPI_BYTES_SENT = 200  # Linux 4.19 and later


@dataclass(frozen=True, slots=True)
class TcpCounters:
    """The traffic of one TCP connection as its local end counts it."""

    bytes_out: int
    bytes_in: int
    segments_out: int
    segments_in: int
    timestamps: bool

    @property
    def header_size(self) -> int:
        return IPV4_HEADER + TCP_HEADER + (TCP_TIMESTAMP_OPTION if self.timestamps else 0)


ConnectionKey = tuple[int, str, int]
"""(local port, remote address, remote port) of a TCP connection."""


def tcp_connections(local_ports: Collection[int]) -> dict[ConnectionKey, TcpCounters]:
    """Counters of every established IPv4 TCP connection whose local port is in ``local_ports``."""
    wanted = set(local_ports)
    found: dict[ConnectionKey, TcpCounters] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
        request = _INET_DIAG_REQ_V2.pack(socket.AF_INET, socket.IPPROTO_TCP, 1 << (_INET_DIAG_INFO - 1), 0, 1 << _TCP_ESTABLISHED)
        header = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
        sock.sendall(header + request)
        while True:
            data = sock.recv(1 << 20)
            offset = 0
            while offset + _NLMSG_HEADER.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSG_HEADER.unpack_from(data, offset)
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + _NLMSG_HEADER.size)
                    raise OSError(-code, f"sock_diag dump failed: {os.strerror(-code)}")
                _parse_diag_message(data, offset + _NLMSG_HEADER.size, offset + length, wanted, found)
                offset += (length + 3) & ~3
            if not data:
                return found


def _parse_diag_message(data: bytes, start: int, end: int, wanted: set[int], found: dict[ConnectionKey, TcpCounters]) -> None:
    local_port, remote_port = struct.unpack_from(">HH", data, start + 4)
    if local_port not in wanted:
        return
    remote = socket.inet_ntoa(data[start + 24 : start + 28])
    offset = start + _INET_DIAG_MSG_SIZE
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            return
        if kind == _INET_DIAG_INFO:
            info = data[offset + _RTATTR.size : offset + length]
            found[(local_port, remote, remote_port)] = _tcp_counters(info)
            return
        offset += (length + 3) & ~3


def _tcp_counters(info: bytes) -> TcpCounters:
    if len(info) >= _TCPI_BYTES_SENT + 8:
        (bytes_out,) = struct.unpack_from("=Q", info, _TCPI_BYTES_SENT)
    else:
        (bytes_out,) = struct.unpack_from("=Q", info, _TCPI_BYTES_ACKED)
    (bytes_in,) = struct.unpack_from("=Q", info, _TCPI_BYTES_RECEIVED)
    segments_out, segments_in = struct.unpack_from("=II", info, _TCPI_SEGS_OUT)
    return TcpCounters(bytes_out, bytes_in, segments_out, segments_in, bool(info[_TCPI_OPTIONS] & _TCPI_OPT_TIMESTAMPS))


@dataclass(frozen=True, slots=True)
class LinkTraffic:
    """Traffic of a link in both directions: payload bytes and packets.

    ``up`` is toward the pool (miner, proxy → pool or sidecar), ``down`` the other way.
    ``header_bytes`` holds the per-packet headers already added up (TCP header sizes
    differ with the timestamp option, so they are summed per connection).
    """

    payload_up: int = 0
    payload_down: int = 0
    packets_up: int = 0
    packets_down: int = 0
    headers_up: int = 0
    headers_down: int = 0

    @property
    def wire_up(self) -> int:
        return self.payload_up + self.headers_up

    @property
    def wire_down(self) -> int:
        return self.payload_down + self.headers_down

    @property
    def wire_total(self) -> int:
        return self.wire_up + self.wire_down

    def __add__(self, other: LinkTraffic) -> LinkTraffic:
        return LinkTraffic(
            self.payload_up + other.payload_up,
            self.payload_down + other.payload_down,
            self.packets_up + other.packets_up,
            self.packets_down + other.packets_down,
            self.headers_up + other.headers_up,
            self.headers_down + other.headers_down,
        )


def udp_traffic(datagrams_up: int, bytes_up: int, datagrams_down: int, bytes_down: int) -> LinkTraffic:
    """UDP datagrams as they cross the wire (IPv4 + UDP header each)."""
    header = IPV4_HEADER + UDP_HEADER
    return LinkTraffic(bytes_up, bytes_down, datagrams_up, datagrams_down, datagrams_up * header, datagrams_down * header)


class TcpLinkMeter:
    """Measures the TCP connections that end at the given server ports, between snapshots.

    The server end counts: its ``in`` is ``up`` (toward the pool), its ``out`` is
    ``down``. A connection that opened after the first snapshot counts from zero;
    one that closed before the second is not counted (the benchmarks keep their
    connections open across a window).
    """

    def __init__(self, server_ports: Iterable[int]) -> None:
        self.server_ports = frozenset(server_ports)
        self._start: dict[ConnectionKey, TcpCounters] = {}

    def start(self) -> None:
        self._start = tcp_connections(self.server_ports)

    def traffic(self) -> LinkTraffic:
        """What crossed since :meth:`start`."""
        total = LinkTraffic()
        for key, now in tcp_connections(self.server_ports).items():
            before = self._start.get(key)
            base = before if before is not None else TcpCounters(0, 0, 0, 0, now.timestamps)
            segments_in = now.segments_in - base.segments_in
            segments_out = now.segments_out - base.segments_out
            total += LinkTraffic(
                payload_up=now.bytes_in - base.bytes_in,
                payload_down=now.bytes_out - base.bytes_out,
                packets_up=segments_in,
                packets_down=segments_out,
                headers_up=segments_in * now.header_size,
                headers_down=segments_out * now.header_size,
            )
        return total


def udp_out_datagrams() -> int:
    """UDP datagrams the host sent (all sockets): ``OutDatagrams`` of /proc/net/snmp, 0 if missing.

    Other programs can only raise it, so over a window it is an upper bound for a
    link's own count (the benchmark's cross-check of its datagram counters).
    """
    try:
        with open("/proc/net/snmp") as handle:
            lines = [line.split() for line in handle if line.startswith("Udp:")]
    except OSError:
        return 0
    if len(lines) < 2 or "OutDatagrams" not in lines[0]:
        return 0
    return int(lines[1][lines[0].index("OutDatagrams")])


def udp_receive_buffer_errors() -> int:
    """Datagrams the host dropped because a socket's receive buffer was full (all sockets).

    ``RcvbufErrors`` of the ``Udp:`` lines of /proc/net/snmp; on a machine running
    only the benchmark, these are the StratumRM link's. 0 where the file is missing.
    """
    try:
        with open("/proc/net/snmp") as handle:
            lines = [line.split() for line in handle if line.startswith("Udp:")]
    except OSError:
        return 0
    if len(lines) < 2 or "RcvbufErrors" not in lines[0]:
        return 0
    return int(lines[1][lines[0].index("RcvbufErrors")])


# --------------------------------------------------------------------------- CPU


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of every thread of ``pid`` so far, in seconds."""
    task_dir = f"/proc/{pid}/task"
    try:
        total_ns = 0
        for tid in os.listdir(task_dir):
            with open(f"{task_dir}/{tid}/schedstat") as handle:
                total_ns += int(handle.read().split()[0])
        return total_ns / 1e9
    except FileNotFoundError:
        with open(f"/proc/{pid}/stat") as handle:
            # the command name (field 2) may contain spaces; fields after ')' are fixed
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class CpuMeter:
    """CPU seconds of several processes between :meth:`start` and :meth:`seconds`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: process_cpu_seconds(pid) for name, pid in self.pids.items()}

    def seconds(self) -> dict[str, float]:
        return {name: process_cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()}


# --------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (0..1) of already sorted values, nearest rank; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def median(values: Iterable[float]) -> float:
    """Median of the finite values; NaN when there are none."""
    finite = sorted(v for v in values if v is not None and not math.isnan(v))
    if not finite:
        return math.nan
    middle = len(finite) // 2
    if len(finite) % 2:
        return finite[middle]
    return (finite[middle - 1] + finite[middle]) / 2

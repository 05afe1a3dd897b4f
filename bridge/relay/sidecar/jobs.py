"""The sidecar's jobs: notify de-duplication (PROTOCOL.md C5), sans-IO.

Every distinct notify (all nine params equal) gets a job handle, sent once as
``rm.job``; the channels that receive it are collected for ``batch_window`` seconds
into one ``rm.notify``. Per-channel order is kept by one rule: before any other line
for a channel listed in a pending ``rm.notify`` is written, the pending ``rm.notify``
lines are written first (:meth:`JobTable.pending_for`, :meth:`JobTable.flush`). Each
channel keeps its last 256 ``job_id -> handle`` pairs; a handle lives while some
channel's table holds it (reference counts), so memory is bounded by channels x 256.
Without ``job-dedup`` every notify goes to its channel as a channel line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import msgspec
from msgspec import Raw

from bridge.bounded import RecentKeys
from bridge.relay.sidecar.counters import SidecarSessionCounters
from bridge.sv1.messages import NotifyParams
from bridge.wire.control import MAX_CHANNELS_PER_NOTIFY, Job, NotifyChannels, encode_channel_request, encode_rm

_MAX_HANDLE: Final = 0xFFFF_FFFF

_encode = msgspec.json.Encoder().encode


class JobEntry:
    """A distinct notify and its handle; ``refs`` counts the channel tables holding it."""

    __slots__ = ("handle", "job_id", "key", "refs")

    def __init__(self, handle: int, job_id: str, key: bytes) -> None:
        self.handle = handle
        self.job_id = job_id
        self.key = key
        self.refs = 0


class JobTable:
    """One session's job handles, the channels' job tables and the ``rm.notify`` lines being collected.

    ``write`` queues a control line (the session's); ``dedup`` is whether ``job-dedup``
    was negotiated.
    """

    def __init__(self, counters: SidecarSessionCounters, write: Callable[[bytes], None], batch_window: float) -> None:
        self.counters = counters
        self._write = write
        self.batch_window = batch_window
        self.dedup = False
        self._entries: dict[int, JobEntry] = {}
        self._by_key: dict[bytes, JobEntry] = {}
        self._next_handle = 1
        self._pending: dict[int, list[int]] = {}
        self._pending_channels: set[int] = set()
        self.due: float | None = None
        """When the collected ``rm.notify`` lines go out (None: none is collected)."""

    def __len__(self) -> int:
        """Live handles (each held by some channel's table)."""
        return len(self._entries)

    @property
    def distinct_notifies(self) -> int:
        """Notifies remembered by content (one per live handle)."""
        return len(self._by_key)

    def get(self, handle: int) -> JobEntry | None:
        return self._entries.get(handle)

    def pending_for(self, ch: int) -> bool:
        """Channel ``ch`` is listed in a collected ``rm.notify``: flush before its next line."""
        return ch in self._pending_channels

    def deliver(self, ch: int, channel_jobs: RecentKeys[str, int], params: NotifyParams, now: float) -> None:
        """The pool sent ``mining.notify`` on channel ``ch`` (whose job table is ``channel_jobs``)."""
        counters = self.counters
        counters.notify_deliveries += 1
        if not self.dedup:
            self._write(encode_channel_request(ch, None, "mining.notify", Raw(_encode(params))))
            return
        if ch in self._pending_channels:
            self.flush()  # an earlier job for this channel must go first
        counters.notify_lines_saved += 1  # the rm.job and rm.notify lines below take theirs back
        key = _encode(params)
        job = self._by_key.get(key)
        if job is None:
            job = JobEntry(self._allocate_handle(), params.job_id, key)
            self._entries[job.handle] = job
            self._by_key[key] = job
            counters.jobs_announced += 1
            counters.notify_lines_saved -= 1
            self._write(encode_rm(Job(job=job.handle, notify=params)))
        self._remember(channel_jobs, job)
        pending = self._pending.get(job.handle)
        if pending is None:
            pending = self._pending[job.handle] = []
        pending.append(ch)
        self._pending_channels.add(ch)
        if len(pending) >= MAX_CHANNELS_PER_NOTIFY:
            self.flush()
        elif self.due is None:
            self.due = now + self.batch_window

    def _remember(self, jobs: RecentKeys[str, int], job: JobEntry) -> None:
        previous = jobs.get(job.job_id)
        job.refs += 1
        for _, dropped in jobs.put(job.job_id, job.handle):
            self._release(dropped)
        if previous is not None:
            self._release(previous)

    def release_all(self, jobs: RecentKeys[str, int]) -> None:
        """A channel is gone: the handles its table held lose a reference."""
        for _job_id, handle in jobs.entries():
            self._release(handle)
        jobs.clear()

    def _release(self, handle: int) -> None:
        job = self._entries.get(handle)
        if job is None:
            return
        job.refs -= 1
        if job.refs <= 0:
            del self._entries[handle]
            del self._by_key[job.key]

    def _allocate_handle(self) -> int:
        handle = self._next_handle
        while handle in self._entries:  # only after 2^32 handles: skip the live ones
            handle = handle % _MAX_HANDLE + 1
        self._next_handle = handle % _MAX_HANDLE + 1
        return handle

    def flush(self) -> None:
        """Write the collected ``rm.notify`` lines."""
        self.due = None
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        self._pending_channels.clear()
        counters = self.counters
        for handle, channels in pending.items():
            counters.notify_lines += 1
            counters.notify_lines_saved -= 1
            self._write(encode_rm(NotifyChannels(job=handle, ch=channels)))

    def discard_pending(self) -> None:
        """The connection is closing: the collected lines will not be written."""
        self._pending.clear()
        self._pending_channels.clear()
        self.due = None

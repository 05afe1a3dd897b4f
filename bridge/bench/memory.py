"""What a role's memory is made of: trio tasks, live objects by type, allocations by code line.

The benchmark roles (:mod:`bridge.bench.roles`) answer the ``memory`` command with
:func:`census`; ``stratumrm bench scale --memory-profile`` takes one census before
the first rig connects and one with every rig working, and prints the difference per
rig (:func:`per_rig`), so a cost per rig is traced to what holds it:

- ``tasks``: live trio tasks (every task costs its coroutine frame and a
  :class:`trio.lowlevel.Task`, about 1.5-3 KiB with its cancel status and nursery);
- ``objects``: objects the garbage collector tracks, counted and sized
  (``sys.getsizeof``, the object itself, not what it refers to) by type;
- ``sites``: with tracemalloc on (the child started with ``PYTHONTRACEMALLOC``),
  the bytes still allocated, by the innermost line of *this project's* code on the
  allocation's stack (so a trio task started by ``bridge/net/sidecar.py:NNN`` is
  charged to that line, not to trio's internals), and by the allocating line itself.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import trio

_PACKAGE = str(Path(__file__).resolve().parent.parent)
_TRIO = str(Path(trio.__file__).resolve().parent)
TOP = 25


def _count_tasks(task: trio.lowlevel.Task) -> int:
    count = 1
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            count += _count_tasks(child)
    return count


def _all_tasks(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
    found = [task]
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            found += _all_tasks(child)
    return found


def _await_chain(task: trio.lowlevel.Task) -> list[tuple[str, str]]:
    """(file, ``function (file:line)``) of each frame a task is suspended in, outermost first."""
    chain = []
    awaitable: Any = task.coro
    while awaitable is not None:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
        if frame is None:
            break
        path = frame.f_code.co_filename
        chain.append((path, f"{frame.f_code.co_name} ({path.rsplit('/', 1)[-1]}:{frame.f_lineno})"))
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)
    return chain


def waits(depth: int = 4) -> dict[str, int]:
    """Where this process's trio tasks are parked, with how many tasks wait there: the
    trio call each task's await chain ends in (``wait_readable``, ``sleep`` ...) and the
    ``depth`` innermost frames of other code above it, innermost first.

    A storm that does not settle leaves tasks waiting somewhere they should not: this
    says where, by count (``stratumrm bench scale`` prints it when rigs do not get to work).
    """
    places: Counter[str] = Counter()
    me = trio.lowlevel.current_task()
    for task in _all_tasks(trio.lowlevel.current_root_task()):
        if task is me:
            continue
        chain = _await_chain(task)
        is_trio = [path.startswith(_TRIO) for path, _name in chain]
        ours = [name for (_path, name), trio_frame in zip(chain, is_trio, strict=True) if not trio_frame]
        entry = next((i for i in range(len(chain) - 1, -1, -1) if not is_trio[i]), -1) + 1
        called = [chain[entry][1].split(" ", 1)[0]] if entry < len(chain) else []  # the trio call it waits in
        if not ours:  # trio's own task (a listener's accept loop, say): its innermost frames
            called, ours = [], [name for _path, name in chain if not name.startswith("_real_async_yield")]
        place = " <- ".join([*called, *reversed(ours[-depth:])])
        places[place or task.name] += 1
    return dict(places.most_common(TOP))


def _sites(sizes: Counter[tuple[str, int]]) -> dict[str, int]:
    """``file:line`` (bridge files relative to the package root, others by their last two parts)."""
    named: Counter[str] = Counter()
    for (path, lineno), size in sizes.items():
        # No pathlib here: its caches would be counted in the next census.
        name = path[len(_PACKAGE) + 1 :] if path.startswith(_PACKAGE) else "/".join(path.rsplit("/", 2)[-2:])
        named[f"{name}:{lineno}"] += size
    return dict(named)


def census() -> dict[str, Any]:
    """This process's tasks, objects by type and (when tracing) allocations by site."""
    gc.collect()
    tasks = _count_tasks(trio.lowlevel.current_root_task())
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj)
    result: dict[str, Any] = {
        "tasks": tasks,
        "objects": {name: [counts[name], sizes[name]] for name in counts},
        "sites": {},
        "lines": {},
    }
    if tracemalloc.is_tracing():
        result["sites"], result["lines"] = _allocations(tracemalloc.take_snapshot())
    return result


def _allocations(snapshot: tracemalloc.Snapshot) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes still allocated by the innermost bridge line on the stack, and by allocating line."""
    ours: Counter[tuple[str, int]] = Counter()
    lines: Counter[tuple[str, int]] = Counter()
    is_ours: dict[str, bool] = {}
    # The raw traces, (domain, size, frames, ...) with frames ((filename, lineno), ...)
    # innermost first: building Trace objects for each would take minutes.
    for trace in snapshot.traces._traces:
        size, frames = trace[1], trace[2]
        lines[frames[0]] += size
        for frame in frames:
            filename = frame[0]
            mine = is_ours.get(filename)
            if mine is None:
                mine = is_ours[filename] = filename.startswith(_PACKAGE) and "/bench/" not in filename
            if mine:
                ours[frame] += size
                break
        else:
            ours[("(outside bridge)", 0)] += size
    return _sites(ours), _sites(lines)


def per_rig(before: dict[str, Any], after: dict[str, Any], rigs: int, top: int = TOP) -> list[str]:
    """The growth from ``before`` to ``after`` per rig, largest first, as report lines."""
    lines = [f"  tasks: {(after['tasks'] - before['tasks']) / rigs:.2f} per rig ({before['tasks']} -> {after['tasks']})"]
    grown = []
    for name, (count, size) in after["objects"].items():
        count0, size0 = before["objects"].get(name, (0, 0))
        if count - count0 > 0:
            grown.append((size - size0, count - count0, name))
    grown.sort(reverse=True)
    total = sum(size for size, _, _ in grown)
    lines.append(f"  gc-tracked objects grown: {total / rigs:.0f} B per rig (object headers only), by type:")
    for size, count, name in grown[:top]:
        lines.append(f"    {size / rigs:8.0f} B {count / rigs:6.2f}/rig  {name}")
    for key, title in (("sites", "by the innermost bridge line on the stack"), ("lines", "by allocating line")):
        if not after[key]:
            continue
        deltas = [(size - before[key].get(site, 0), site) for site, size in after[key].items()]
        deltas.sort(reverse=True)
        total = sum(size for size, _ in deltas)
        lines.append(f"  tracemalloc, still allocated: {total / rigs:.0f} B per rig, {title}:")
        for size, site in deltas[:top]:
            if size <= 0:
                break
            lines.append(f"    {size / rigs:8.0f} B  {site}")
    return lines

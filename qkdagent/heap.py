"""The interpreter's cyclic garbage collector in a long-running agent process.

Every collection of the oldest generation walks every object the process holds: at 10,000
links, hundreds of milliseconds with the event loop stopped, and about a tenth of the agent's
CPU. What start-up builds (modules, configs, components, links) lives as long as the process,
and rotations make no cyclic garbage (tests/test_heap.py checks it over HTTPS; until December
2026 each reply's parser and its callbacks were a cycle), so once the agent is ready the
start-up heap is collected once and frozen out of later collections (`gc.freeze`); they walk
only what rotations make. Measured with `bench_core.py
procs` (10,000 links, two runs each): CPU per rotation 2.47/2.48 and 2.31/2.33 ms (alice/bob)
without, 2.20/2.30 and 1.98/2.04 ms with; the links' latest rotation p99 453-481 against
164-178 ms.

Frozen objects are never collected, even once unreachable. So a reload, which replaces links
and components (they hold reference cycles), thaws the heap first and collects the old ones
before freezing again; and nothing but `qkdagent run`, one agent per process, freezes (a test
process running many agents would keep every one of them).
"""

from __future__ import annotations

import gc


def settle_heap(*, thaw: bool = False) -> int:
    """Collect what is garbage now, then freeze every object left out of later collections;
    `thaw` first returns the frozen objects to the collector (after a reload, whose replaced
    links and components must go). Returns how many objects are frozen."""
    if thaw:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()

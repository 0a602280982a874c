"""The interpreter's cyclic garbage collector in a long-running agent process.

Every collection of the oldest generation walks every object the process holds: at 10,000
links, hundreds of milliseconds with the event loop stopped, and about a tenth of the agent's
CPU. What start-up builds (modules, configs, components, links) lives as long as the process,
and rotations make no cyclic garbage (tests/test_heap.py checks it over HTTPS; until December
2026 each reply's parser and its callbacks were a cycle), so once the agent is ready the
start-up heap is collected once and frozen out of later collections (`gc.freeze`); they walk
only what rotations make. Measured with `bench_core.py procs` (10,000 links, two runs each):
CPU per rotation 2.47/2.48 and 2.31/2.33 ms (alice/bob) without, 2.20/2.30 and 1.98/2.04 ms
with; the links' latest rotation p99 453-481 against 164-178 ms.

What rotations make still reached the oldest generation: a link's record, keys and clock
live until its next rotation, and at 10,000 links the tens of thousands of rotations under way
in a round outlive two young collections, so every few hundred milliseconds a collection of
the oldest generation walked some 80,000 of them, 40-60 ms each (about 1 s of each agent's
CPU per round of 10,000 rotations, 0.1 ms per rotation). A young generation of
`YOUNG_THRESHOLD` objects instead of the interpreter's 700 lets them die young, by reference
count: measured the same way (December 2026), the collector's time over a whole run fell
from 3.4-4.0 s to 0.6-0.7 s per agent, with one collection of the oldest generation after
start-up instead of about 16 per round; a young collection takes 2 ms (at most 25 ms).

Frozen objects are never collected, even once unreachable. So a reload, which replaces links
and components (they hold reference cycles), thaws the heap first and collects the old ones
before freezing again; and nothing but `qkdagent run`, one agent per process, freezes (a test
process running many agents would keep every one of them).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
"""Allocations (less deallocations) of tracked objects between young collections, from the
agent's start-up on (the interpreter's default is 700)."""


def settle_heap(*, thaw: bool = False) -> int:
    """Collect what is garbage now, then freeze every object left out of later collections;
    `thaw` first returns the frozen objects to the collector (after a reload, whose replaced
    links and components must go), and collect the young generation less often
    (`YOUNG_THRESHOLD`). Returns how many objects are frozen."""
    if thaw:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
    return gc.get_freeze_count()

"""The cyclic garbage collector, set up for a long-running gateway process once startup is over.

Two changes to CPython's defaults, each measured on the bench machine (`nswgw run --processes 2`,
RabbitMQ, 5 KB messages):

* ``gc.freeze()``: compiled schemas, the trust store, the registry and the imported modules are ~93,000
  container objects that live as long as the process, and every full collection walked all of them:
  ~30 ms each, with the event loop stopped, about every 2,000 messages a process handled. Frozen, they
  sit in the permanent generation, which collections skip; a full collection then takes ~1.5 ms.
* the youngest generation's threshold, 700 -> ``YOUNG_THRESHOLD``: the collector counts container
  objects allocated minus those freed, and nearly everything a message allocates is freed by reference
  counting when its request ends, so at the default a collection ran every ~25 ms to find almost
  nothing (~400 in 10 s per process, each walking the objects of every request in flight). At 10,000
  it runs about once in 10 s; cyclic garbage (an exception's traceback, say) waits at most that many
  net allocations longer.

Both together, old and new code in alternation: at 500 msg/s offered, median p99 96 -> 65 ms (p50
unchanged); at saturation the ratio to the naive pipeline 0.50-0.52 -> 0.53-0.55 (bench/README.md).

Frozen objects are still freed by reference counting; only a cycle among them that becomes garbage
later is never reclaimed, which is why the freeze happens once, when startup is over.
"""

from __future__ import annotations

import gc
from typing import Final

import structlog

log = structlog.get_logger("nsw.runtime")

YOUNG_THRESHOLD: Final = 10_000


def settle_startup_heap() -> int:
    """Collect what startup left as garbage, freeze the rest, raise the young generation's threshold;
    the number of objects frozen."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    frozen = gc.get_freeze_count()
    log.info("runtime.heap_settled", frozen=frozen, thresholds=list(gc.get_threshold()))
    return frozen

"""The segment hand-off from a task's ingest thread to its record consumer is
bounded: a consumer that stops taking makes the ingest thread wait, and a task
that ends releases the waiting thread (the segment's frames are withdrawn)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from fractions import Fraction

from streamguard.media.segmenter import Segment
from streamguard.pipeline.segments import ClosedSegment
from streamguard.services.streams import SegmentQueue


def closed(index: int) -> ClosedSegment:
    seg = Segment(index, Fraction(index), Fraction(index + 1))
    return ClosedSegment(seg, [(Fraction(index), Future())], None, time.monotonic())


def test_the_hand_off_is_bounded_and_a_stop_releases_the_waiting_thread() -> None:
    async def scenario() -> None:
        queue = SegmentQueue(asyncio.get_running_loop(), limit=2)
        stop = threading.Event()
        results: list[bool] = []
        items = [closed(i) for i in range(4)]

        def ingest() -> None:
            for item in items:
                results.append(queue.put(item, stop.is_set))

        thread = threading.Thread(target=ingest)
        thread.start()
        await asyncio.sleep(0.6)
        assert results == [True, True], "the third segment must wait for the consumer"
        assert (await queue.get()) is items[0]  # taking one frees a slot
        await asyncio.sleep(0.6)
        assert results == [True, True, True]
        stop.set()  # the task ends at once: the waiting segment is given up
        await asyncio.to_thread(thread.join, 5)
        assert results == [True, True, True, False]
        assert items[3].frames[0][1].cancelled()
        assert [(await queue.get()).segment.index for _ in range(2)] == [1, 2]
        queue.close()
        assert await queue.get() is None

    asyncio.run(scenario())

"""Dynamic batching: concurrent requests' images are grouped into one forward pass.

The first waiting image opens a batch; the batch closes when it holds `max_batch_size` images or
`max_delay_s` has passed since it opened, and runs in a worker thread, off the event loop. The queue is
bounded: when it is full, new work is refused at once (the endpoint answers 503) instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol


class ModelRunner(Protocol):
    """What the endpoint submits preprocessed images to: this module's DynamicBatcher (the model in this
    process), or imgtune.serving.replicas.ReplicaPool (the model on Ray Serve replicas)."""

    @property
    def depth(self) -> int: ...  # images waiting (or in flight): the queue bound counts them

    @property
    def alive(self) -> bool: ...  # False once requests could only wait for ever

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit_many(self, items: list[Any]) -> list[Any]: ...  # one result per item, in order; or QueueFull


class QueueFull(Exception):
    """The batcher holds as many images as it may; try again later."""


class DynamicBatcher:
    def __init__(
        self,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        max_batch_size: int = 32,
        max_delay_s: float = 0.005,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch_size < 1 or max_queue < max_batch_size or max_delay_s < 0:
            raise ValueError("need max_batch_size >= 1, max_queue >= max_batch_size and max_delay_s >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future]] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgtune-inference")
        self.task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    @property
    def alive(self) -> bool:
        """False once the task that runs batches has ended (cancelled, or killed by an error it let through)."""
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        while not self.queue.empty():
            _, future = self.queue.get_nowait()
            if not future.done():
                future.set_exception(QueueFull("the server is shutting down"))
        self.executor.shutdown(wait=True)

    async def submit_many(self, items: list[Any]) -> list[Any]:
        """Results for all items, in order; all are queued, or none (QueueFull)."""
        if self.queue.qsize() + len(items) > self.max_queue:
            raise QueueFull(f"{self.queue.qsize()} images are waiting (at most {self.max_queue})")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures, strict=True):
            self.queue.put_nowait((item, future))
        return list(await asyncio.gather(*futures))

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay_s
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return [(item, future) for item, future in batch if not future.cancelled()]  # clients that gave up

    async def _serve(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._run(batch)
            except asyncio.CancelledError:
                self._fail(batch, QueueFull("the server is shutting down"))
                raise
            except Exception as exc:  # this batch's requests get the error; the next batch runs as usual
                self._fail(batch, exc)

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        if not batch:
            return
        if self.on_batch is not None:
            self.on_batch(len(batch))
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self.executor, self.run_batch, [item for item, _ in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"the model answered {len(results)} results for a batch of {len(batch)}")
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    @staticmethod
    def _fail(batch: list[tuple[Any, asyncio.Future]], exc: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)

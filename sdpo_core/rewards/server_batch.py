"""Batching of concurrent ``/score`` requests into one reward call (the reason a reward server
exists: a model on a GPU scores 64 images in little more time than 4).

One worker takes the first queued request, then waits up to ``wait_s`` for more requests of the
same image size until ``max_batch`` images, concatenates them in arrival order, calls the reward
once in a thread and hands each request its slice. A reward that scores each image on its own
(every built-in one) gives each request the values it would get alone; one that normalises over
its batch does not, so serve such a reward with ``--max-batch 1``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from sdpo_core.rewards import RewardFn, check_rewards


@dataclass
class Scored:
    """One request's (N,) float32 scores and the reward call it was part of."""

    values: torch.Tensor
    batch_images: int
    batch_requests: int


@dataclass
class _Job:
    images: torch.Tensor  # (N, 3, H, W) float32 in [0, 1]
    prompts: list[str]
    future: asyncio.Future[Scored] = field(repr=False)


class Batcher:
    """``await score(images, prompts)`` from request handlers; ``run()`` is the one worker task."""

    def __init__(self, reward_fn: RewardFn, name: str, max_batch: int, wait_s: float) -> None:
        self.reward_fn, self.name = reward_fn, name
        self.max_batch, self.wait_s = max_batch, wait_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._held: _Job | None = None  # taken from the queue but left for the next batch

    async def score(self, images: torch.Tensor, prompts: list[str]) -> Scored:
        job = _Job(images, prompts, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def run(self) -> None:
        while True:
            jobs = await self._collect()
            await self._score(jobs)

    async def _collect(self) -> list[_Job]:
        first = self._held or await self.queue.get()
        self._held = None
        jobs, total = [first], first.images.shape[0]
        deadline = time.monotonic() + self.wait_s
        while total < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    break
            same_size = job.images.shape[1:] == first.images.shape[1:]
            if not same_size or total + job.images.shape[0] > self.max_batch:
                self._held = job
                break
            jobs.append(job)
            total += job.images.shape[0]
        return jobs

    async def _score(self, jobs: list[_Job]) -> None:
        counts = [job.images.shape[0] for job in jobs]
        images = torch.cat([job.images for job in jobs]) if len(jobs) > 1 else jobs[0].images
        prompts = [p for job in jobs for p in job.prompts]
        try:
            values = await asyncio.to_thread(self.reward_fn, images, prompts)
            _check_shape(self.name, values, len(prompts))
        # Any failure of the reward goes to every request of the batch (the server answers 500).
        except Exception as exc:
            for job in jobs:
                _settle(job.future, exc)
            return
        start = 0
        for job, n in zip(jobs, counts, strict=True):
            try:  # non-finite values fail only the request they belong to
                part = check_rewards(self.name, values[start : start + n], n)
            except Exception as exc:
                _settle(job.future, exc)
            else:
                _settle(job.future, Scored(part, len(prompts), len(jobs)))
            start += n


def _check_shape(name: str, values: object, n: int) -> None:
    """The batch-level part of ``check_rewards``: a tensor of shape (n,) (finiteness is per request)."""
    if not isinstance(values, torch.Tensor) or values.shape != (n,):
        check_rewards(name, values, n)


def _settle(future: asyncio.Future[Scored], outcome: Scored | BaseException) -> None:
    if future.done():  # its request was cancelled (the client left)
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)

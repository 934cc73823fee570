"""The trainer's public hooks: called in order, with the epochs, metrics and reward jobs of the run,
on a resume from the epoch after the checkpoint; a bench-like callback counts the reward queries."""

from __future__ import annotations

import json

import pytest

from sdpo_core.training.callbacks import TrainerCallback
from sdpo_core.training.scoring import ScoredBatch
from sdpo_core.training.trainer import Trainer


class Recorder(TrainerCallback):
    def __init__(self, stop_at_epoch: int | None = None):
        self.events: list[tuple] = []
        self.metrics: list[dict] = []
        self.scored: list[ScoredBatch] = []
        self.stop_at_epoch = stop_at_epoch

    def on_run_start(self, trainer, start_epoch):
        self.events.append(("run_start", start_epoch))

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.stop_at_epoch:
            raise KeyboardInterrupt
        self.events.append(("epoch_start", epoch))

    def on_rewards(self, trainer, epoch, scored):
        self.events.append(("rewards", epoch))
        self.scored.append(scored)

    def on_optimizer_step(self, trainer):
        self.events.append(("step", trainer.global_step))

    def on_epoch_end(self, trainer, epoch, metrics):
        self.events.append(("epoch_end", epoch))
        self.metrics.append(dict(metrics))

    def on_run_end(self, trainer, final):
        self.events.append(("run_end", final.name))


def test_hooks_see_every_epoch_in_order_with_its_metrics(tiny_cfg, tmp_path):
    rec = Recorder()
    tr = Trainer(tiny_cfg("sample.num_batches_per_epoch=2", "sample.num_steps=3"), tmp_path, callbacks=[rec])
    tr.run()
    steps = tr.plan.optimizer_steps_per_epoch
    expected = [("run_start", 0)]
    for epoch in range(2):
        expected += [("epoch_start", epoch), ("rewards", epoch), ("rewards", epoch)]
        expected += [("step", epoch * steps + i) for i in range(1, steps + 1)]
        expected += [("epoch_end", epoch)]
    assert rec.events == expected + [("run_end", "final")]
    # on_epoch_end gets the line written to train_metrics.jsonl
    lines = [json.loads(x) for x in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
    assert rec.metrics == lines and [m["epoch"] for m in rec.metrics] == [0, 1]
    # each reward job: (N, Q) rewards of the batch's 2B trajectories, at most 3 queries each
    b = tr.cfg.sample.batch_size
    for scored in rec.scored:
        assert scored.rewards.shape == (2 * b, 3)
        assert 2 * b <= scored.queried <= 6 * b and scored.decoded >= scored.queried
        assert scored.seconds >= scored.decode_seconds + scored.reward_seconds - 1e-6
    assert sum(s.rewards[:, -1].mean() for s in rec.scored[:2]) / 2 == pytest.approx(lines[0]["reward/last"])


def test_a_resumed_run_starts_the_hooks_at_the_next_epoch(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.epochs=3", "train.async_checkpoint=false")
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path, callbacks=[Recorder(stop_at_epoch=2)]).run()
    rec = Recorder()
    Trainer(cfg, tmp_path, callbacks=[rec]).run(resume=True)
    assert rec.events[0] == ("run_start", 2)
    assert [e for e in rec.events if e[0] in ("epoch_start", "epoch_end")] == [("epoch_start", 2), ("epoch_end", 2)]


class QueryCounter(TrainerCallback):
    """What bench/common.py counts: reward queries so far, written per epoch with the metrics."""

    def __init__(self):
        self.queries, self.rows = 0, []

    def on_rewards(self, trainer, epoch, scored):
        self.queries += scored.queried

    def on_epoch_end(self, trainer, epoch, metrics):
        self.rows.append({"epoch": epoch, "queries_cum": self.queries, "time/epoch": metrics["time/epoch"]})


def test_a_counting_callback_sees_the_queries_the_reward_function_answers(tiny_cfg, tmp_path):
    counter, calls = QueryCounter(), []
    tr = Trainer(tiny_cfg("train.method=ddpo"), tmp_path, callbacks=[counter])
    inner = tr.reward_fn

    def counted(images, prompts):
        calls.append(len(images))
        return inner(images, prompts)

    tr.rollout.score.reward_fn = counted  # the reference count, taken at the reward function itself
    tr.run()
    # DDPO scores each trajectory's final state once
    per_epoch = 2 * tr.cfg.sample.batch_size * tr.cfg.sample.num_batches_per_epoch
    assert [r["queries_cum"] for r in counter.rows] == [per_epoch, 2 * per_epoch] and sum(calls) == 2 * per_epoch
    assert all(r["time/epoch"] > 0 for r in counter.rows)

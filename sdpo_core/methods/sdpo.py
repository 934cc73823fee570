"""SDPO (paper §4): dense rewards from three queries, discounted returns, reward-difference loss."""

from __future__ import annotations

from sdpo_core.methods.method import Method
from sdpo_core.rl.advantages import discounted_returns
from sdpo_core.rl.dense_rewards import drop_unused_queries, predict_dense_rewards, query_steps, similarities
from sdpo_core.rl.losses import sdpo_loss


class SDPO(Method):
    name = "sdpo"
    trajectories_per_prompt = 2
    shared_noise = True  # the pair differs only by its step noise (paper section 4.1)
    trajectories_per_item = 2
    item_noun = "pairs"
    # an optimizer step per step position (paper section 4.3's step-shuffled updates)
    update_schedule = "per_step"

    @property
    def tracked_steps(self) -> int:
        return self.num_steps

    def scored_steps(self, x0):
        anchor, sims = (v.cpu() for v in similarities(x0))  # §4.2: first, anchor, last
        steps = query_steps(anchor, x0.shape[1])
        if self.train.skip_unused_queries:
            steps = drop_unused_queries(steps, self.train.anchor, self.train.dense_reward)
        return steps, {"anchor": anchor, "sims": sims}

    def returns(self, rewards_queried, extras):
        train = self.train
        dense = predict_dense_rewards(rewards_queried, extras["sims"], extras["anchor"], train.anchor,
                                      train.dense_reward)
        return discounted_returns(dense, train.gamma)

    def loss(self, log_probs_new, log_probs_old, advantages, weights):
        (n1, n2), (o1, o2), (a1, a2) = log_probs_new, log_probs_old, advantages
        return sdpo_loss(n1, o1, n2, o2, a1, a2, weights, self.train.clip_range, self.train.adv_clip_max)

    def reward_stats(self, rewards_queried):
        stats = super().reward_stats(rewards_queried)
        stats.update({"reward/first": float(rewards_queried[:, 0].mean()),
                      "reward/anchor": float(rewards_queried[:, 1].mean())})
        return stats

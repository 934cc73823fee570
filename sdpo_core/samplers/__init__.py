"""Stochastic samplers with log-probs (see ``base.py``): one file per sampler."""

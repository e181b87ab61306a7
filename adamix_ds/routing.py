"""Rank-synchronised stochastic routing without communication.

The expert chosen for a projection is a pure function of (seed, stream, forward counter, layer,
projection). Every data-parallel rank runs the same number of training forward passes, so every rank
computes the same choice with no broadcast, and a restored counter replays the same stream.
"""

from __future__ import annotations

import enum

import numpy as np


class Projection(enum.IntEnum):
    """Which projection of an adaptation slot is being routed."""

    DOWN = 0
    UP = 1


class Stream(enum.IntEnum):
    """Independent random streams: training passes and ``eval_mode="random"`` never share draws."""

    TRAIN = 0
    EVAL = 1


def choose_expert(seed: int, stream: Stream, forward_count: int, layer_id: int, projection: Projection, num_experts: int) -> int:
    """Index of the expert used by ``projection`` of layer ``layer_id`` at pass ``forward_count``.

    Uniform over ``num_experts``; ``SeedSequence`` hashes the whole key, so neighbouring steps, layers and
    the two projections draw independently.
    """
    if num_experts == 1:
        return 0
    entropy = [seed, int(stream), forward_count, layer_id, int(projection)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] % num_experts)

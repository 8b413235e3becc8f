"""Seeds of the parts of a run (epochs, minibatches, selection rounds, ranks), derived from the run's one seed."""
from __future__ import annotations


def derive_seed(seed: int, index: int) -> int:
    """The seed of part ``index`` (an epoch, a minibatch, a selection round) of a run seeded with ``seed``: distinct
    for every (seed, index) pair a run can meet, so parts never share random streams."""
    return seed * 1_000_003 + index

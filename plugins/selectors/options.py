"""Every built-in coreset selector's options and its lazy declaration, torch-free: listing, citing and validating a
recipe read them without importing the modules that implement the selectors (imported when a run needs them)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from rsslctl import Declared, Number, hookimpl, opt


@dataclasses.dataclass
class RCSOptions:
    unit: int = opt(0, "images per selection unit; 0 = one training minibatch (reference); finer units must divide "
                       "the batch size", min=0)
    head_lr: float = opt(0.01, "learning rate of the one-step layer update after each pick (Coreset_lr); "
                               "0 = no update (plain top-k by gradient match, no full gradients kept)", min=0)
    double_step: bool = opt(False, "reference behaviour: the update is applied twice (effective 2·head_lr)")
    divergence: Literal["auto", "minmax_kl", "softmax_kl"] = opt(
        "auto", "RD: minmax_kl (small-scale ACL-RCS), softmax_kl (ImageNet, SAT-RCS); auto = the target's default")
    attack: str = opt("pgd", "attack plugin maximising RD on the validation set")
    eps: Number = opt(8 / 255, "RD attack radius", min=0)
    step_size: Number = opt(2 / 153, "RD attack step (reference: (10/255)/3)", min=0)
    steps: int = opt(3, "RD attack iterations (reference: 3; ImageNet variants: 1)", min=1)
    reattack: bool = opt(True, "regenerate the adversarial validation examples after each pick (reference); "
                               "false = attack once per round, recompute only the gradient")
    clamp_start: bool = opt(True, "clip the RD attack's random start into [0, 1] (false = reference PGD)")
    chunk: int = opt(0, "greedy search locally within chunks of this many units, budget split proportionally, "
                        "layers reset after each chunk (ImageNet variant); 0 = one global search", min=0)


DECLARED = [
    Declared("coreset", "random", "random_coreset",
             "Uniform random subset of the training pool (the baseline for every coreset method)."),
    Declared("coreset", "rcs", "rcs",
             ("RCS: greedy selection matching training gradients to the validation RD gradient "
              "(robustness-aware)."), RCSOptions,
             citation=("@inproceedings{xu2023rcs, title={Efficient Adversarial Contrastive Learning via "
                       "Robustness-Aware Coreset Selection}, author={Xu, Xilie and Zhang, Jingfeng and Liu, "
                       "Feng and Sugiyama, Masashi and Kankanhalli, Mohan}, booktitle={NeurIPS}, year={2023}}")),
]
#: name → BibTeX; the implementing classes read their ``citation`` from here
CITATION = {d.name: d.citation for d in DECLARED}


@hookimpl
def rsslctl_declarations() -> list[Declared]:
    return DECLARED

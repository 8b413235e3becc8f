"""Every built-in attack's options and its lazy declaration, torch-free: listing, citing and validating a
recipe read them without importing the modules that implement the attacks (imported when a run needs them)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from rsslctl import Declared, Number, hookimpl, opt


@dataclasses.dataclass
class FGSMOptions:
    eps: Number = opt(8 / 255, "radius of the ε-ball, e.g. '8/255'", min=0)
    step_size: Number = opt(0.0, "step size; 0 = ε (plain FGSM) or 1.25·ε with random_start (FGSM-RS)", min=0)
    norm: Literal["linf", "l2"] = opt("linf", "threat model")
    random_start: bool = opt(False, "FGSM-RS: start from a uniform random point in the ε-ball")


@dataclasses.dataclass
class PGDOptions:
    eps: Number = opt(8 / 255, "radius of the ε-ball, e.g. '8/255'", min=0)
    step_size: Number = opt(2 / 255, "step α per iteration", min=0)
    steps: int = opt(5, "number of iterations", min=1, max=100_000)
    norm: Literal["linf", "l2"] = opt("linf", "threat model")
    random_start: bool = opt(True, "start from a uniform random point in the ε-ball")
    clamp_start: bool = opt(True, "clip the random start into [0, 1] before the first step "
                                  "(false = reference ACL behaviour)")


DECLARED = [
    Declared("attack", "fgsm", "fgsm",
             "Fast gradient sign method (one step), with the FGSM-RS random-start variant.", FGSMOptions,
             citation=("@inproceedings{goodfellow2015fgsm, title={Explaining and Harnessing Adversarial "
                       "Examples}, author={Goodfellow, Ian J. and Shlens, Jonathon and Szegedy, Christian}, "
                       "booktitle={ICLR}, year={2015}}")),
    Declared("attack", "pgd", "pgd",
             "Projected gradient descent, L∞ or L2, with optional uniform random start.", PGDOptions,
             citation=("@inproceedings{madry2018pgd, title={Towards Deep Learning Models Resistant to "
                       "Adversarial Attacks}, author={Madry, Aleksander and Makelov, Aleksandar and Schmidt, "
                       "Ludwig and Tsipras, Dimitris and Vladu, Adrian}, booktitle={ICLR}, year={2018}}")),
]
#: name → BibTeX; the implementing classes read their ``citation`` from here
CITATION = {d.name: d.citation for d in DECLARED}


@hookimpl
def rsslctl_declarations() -> list[Declared]:
    return DECLARED

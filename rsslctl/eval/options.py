"""What the robustness suite measures (``SuiteOptions``), torch-free: the flags of `rsslctl evaluate` and
`rsslctl finetune` are derived from it, so their ``--help`` imports no torch."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from rsslctl.base.errors import UserError
from rsslctl.base.limits import MAX_BATCH, MAX_INT, MAX_SEED, MAX_STEPS
from rsslctl.eval.metrics import setting

AA_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


@dataclasses.dataclass(frozen=True)
class SuiteOptions:
    """What `rsslctl evaluate --mode` measures; the defaults are the RobustSSL benchmark's protocol, and the one
    place they are written (the command-line flags are derived from these fields, see ``metrics.setting``). The
    attack plugins come from the recipe's [evaluation] table (``attack``, ``single_step_attack``, ``clamp_start``)."""

    eps: float = setting(8 / 255, "Attack radius (L∞: e.g. 8/255; L2: e.g. 0.5).", "eps")
    step_size: float = setting(2 / 255, "PGD step size.", "eps")
    pgd_steps: int = setting(20, "PGD iterations.", "int", lo=1, hi=MAX_STEPS)
    norm: str = setting("linf", "Threat model.", "choice", choices=("linf", "l2"))
    fgsm: bool = setting(True, "Also report FGSM accuracy.", "switch", decides=False)
    autoattack: bool = setting(False, "Run AutoAttack (pyautoattack); resumable through its state file.", "flag")
    aa_version: str = setting("standard", "AutoAttack version (custom needs --aa-attacks).", "choice",
                              choices=("standard", "plus", "rand", "custom"))
    aa_attacks: tuple[str, ...] = setting((), "Custom AutoAttack list, e.g. apgd-ce,apgd-t,fab-t,square.", "names",
                                          choices=AA_ATTACKS, show_default=False)
    aa_limit: int = setting(0, "AutoAttack on a seeded random subset of N test images (0 = all).", "int", hi=MAX_INT,
                            show_default=False)
    aa_batch: int = setting(128, "AutoAttack batch size.", "int", lo=1, hi=MAX_BATCH, decides=False)
    corruptions: bool = setting(False, "Common corruptions: CIFAR-10-C/100-C files if present, else generated.", "flag")
    corruption_dir: str = setting("", "Folder with the CIFAR-C .npy files (default: data root).", "text",
                                  decides=False, show_default=False)
    corruption_limit: int = setting(0, "First N images per severity (0 = all).", "int", hi=MAX_INT,
                                    show_default=False)
    eps_curve: tuple[float, ...] = setting(tuple(e / 255 for e in (0, 1, 2, 4, 8, 16)),
                                           "ε values for the accuracy-vs-ε plot (L∞ in 1/255 units; '' = none).",
                                           "eps_list", decides=False)
    test_limit: int = setting(0, "Evaluate on the first N test images (0 = all).", "int", hi=MAX_INT,
                              show_default=False)
    seed: int = setting(0, "Seed of attacks and subsets.", "int", flag="--eval-seed", hi=MAX_SEED)
    batch_size: int = 256
    attack: str = setting("", "", "text", flag="-")
    single_step_attack: str = setting("", "", "text", flag="-")
    clamp_start: bool = setting(True, "", "switch", flag="-")
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # settings of registered metrics

    def check(self) -> None:
        """Relations between settings that each read alone."""
        if self.aa_attacks and self.aa_version != "custom":
            raise UserError("--aa-attacks needs --aa-version custom")

    def make(self, name: str, **values: Any) -> Any:
        """The attack plugin ``name`` with this suite's norm and start clipping (keys it does not take are dropped)."""
        from rsslctl.adversary.attack import make_attack  # torch: only when the suite runs
        return make_attack(name, "evaluation", known_only=True, norm=self.norm, clamp_start=self.clamp_start, **values)

"""DeACL (Zhang, Zhang, Zhang, Niu, Feng, Yoo, Kweon, "Decoupled Adversarial Contrastive Learning for
Self-supervised Adversarial Robustness", ECCV 2022): two stages.

Stage 1 is any standard SSL run (e.g. a simclr recipe); its evaluated encoder becomes a frozen teacher t
(``method.teacher`` = that run directory). Stage 2 trains a student f from scratch by adversarial distillation on
weakly augmented images x (random crop with 4 px padding + flip): the student's clean features match the teacher's
and its adversarial features match its own clean ones,
L = −cos(f(x), t(x)) − β·cos(f(x̃), f(x)), β = 2, where x̃ maximises −cos(f(x̃), t(x)) (PGD-5, α 2/255, ε 8/255,
eval mode), i.e. the attack pushes the student away from the teacher's target. Features are backbone features
(no projector), single BN.

Equal by default to the authors' code (github.com/pantheon5100/DeACL, ``solo/methods/mocov2_distillation_AT.py``
``MoCoV2KDAT.training_step`` / ``generate_training_AE``; commit 3fb81e3): the attack in eval mode against the frozen
teacher's features, the loss on one train-mode forward of [x; x̃], gradients through both cosine terms. The
reference's random start is not clipped to [0, 1] before the first forward: ``recipes/deacl.toml`` sets
``[attack] clamp_start = false`` (the attack plugin's default clips it). Remaining differences: the reference's attack
objective is the batch sum of −cos × 256 (an fp16 guard; with sign steps the steps are the same); its online linear
classifier on detached eval-mode features (a monitor, no gradient into the student) is not trained here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rsslctl import FrozenTeacher, Method, crop_flip, eval_mode, every_column, fp32, hookimpl
from rsslctl_plugins.methods.options import CITATION, DeACLOptions

#: RobustSSL benchmark fine-tuning row shared by AdvCL, A-InfoNCE and DeACL (AFF single-BN: --dualBN 0)
ADVCL_FAMILY_ROW = {"SLF": every_column(batch_size=512, lr=0.01, milestones=(15, 20)),
                    "ALF": every_column(batch_size=512, lr=0.01, milestones=(15, 20)),
                    "AFF": every_column(batch_size=128, lr=0.1, milestones=(15, 20), dual_bn=False)}


def deacl_loss(f_clean: Tensor, f_adv: Tensor, t_clean: Tensor, beta: float) -> Tensor:
    """L = −mean cos(f(x), t(x)) − β·mean cos(f(x̃), f(x)) (Zhang et al., ECCV 2022), in fp32; ``t_clean`` is the
    frozen teacher's (no gradient)."""
    with fp32(f_clean):
        f, fa, t = f_clean.float(), f_adv.float(), t_clean.detach().float()
        return -F.cosine_similarity(f, t, dim=1).mean() - beta * F.cosine_similarity(fa, f, dim=1).mean()


class DeACL(Method):
    """DeACL: adversarial distillation of a frozen standard-SSL teacher (stage 2 of two)."""

    name = "deacl"
    citation = CITATION["deacl"]
    Options = DeACLOptions
    needs_attack = True
    finetune_rows = {"DeACL": ADVCL_FAMILY_ROW}

    def __init__(self, options: DeACLOptions, encoder, attack, augment) -> None:
        super().__init__(options, encoder, attack, augment)
        self.teacher = FrozenTeacher(options.teacher, "method.teacher")

    def prepare(self, images: Tensor, total_steps: int) -> None:
        device = next(self.encoder.parameters()).device
        self.teacher.load(device)
        self.teacher.check_compatible(self.encoder, images[:1].float().div(255).to(device), same_width=True)

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        enc = self.encoder
        x = crop_flip(images, self.options.padding, None)
        t = self.teacher.features(x)
        with eval_mode(enc):
            adv = self.attack.perturb(x, lambda xa: -F.cosine_similarity(enc.features(xa).float(), t, dim=1).sum())
        f_clean, f_adv = enc.features(torch.cat((x, adv))).chunk(2)
        loss = deacl_loss(f_clean, f_adv, t, self.options.beta)
        return loss, {"loss_adv": loss.detach()}

    def run_state(self) -> dict[str, Tensor]:
        return self.teacher.state()

    def load_run_state(self, state: dict[str, Tensor]) -> None:
        self.teacher.load_state(state)


@hookimpl
def rsslctl_methods() -> list[type]:
    return [DeACL]

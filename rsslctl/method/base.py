"""The method interface (solo-learn style): one class per method holding its views and its loss.

A method is an ``nn.Module`` wrapping the encoder (and any extra parts such as a momentum encoder),
so its whole state is checkpointed. The engine calls ``training_step`` once per optimizer step. Everything the
core needs to know about a method is declared here — nothing is looked up by the method's name.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from torch import Tensor, nn

from rsslctl.adversary.attack import Attack
from rsslctl.base.options import Plugin
from rsslctl.data.augment import ViewAugment
from rsslctl.nn.encoder import Encoder

if TYPE_CHECKING:
    from rsslctl.method.coreset import CoresetTarget

#: fine-tuning hyper-parameters: row name → mode (SLF/ALF/AFF) → table column → settings (see rsslctl.train.classify)
FinetuneRows = Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]


class Method(nn.Module, Plugin):
    """Base class of method plugins, built as ``cls(options, encoder, attack, augment)``."""

    #: does the method need an [attack] section (adversarial training)?
    needs_attack: ClassVar[bool] = False
    #: does the method want a dual-BN encoder when [encoder] dual_bn = "auto"?
    wants_dual_bn: ClassVar[bool] = False
    #: does the method train the Encoder's projection head (``encoder(x)``)? Methods that put their own heads on
    #: ``encoder.features(x)`` say False, so a combination of methods knows which of them would share that head
    uses_projection_head: ClassVar[bool] = True
    #: the kind of backbone the method needs: "any", or "vit" (a vision transformer with patch tokens and an absolute
    #: positional embedding); tests and benchmarks use it to pick a suitable tiny backbone
    backbone_kind: ClassVar[str] = "any"
    #: the rows of the fine-tuning hyper-parameter table this method's papers define (``finetune_row`` picks one)
    finetune_rows: ClassVar[FinetuneRows] = {}
    #: optimizer steps per minibatch; free adversarial training replays each minibatch m times
    replays: int = 1
    #: reference free-AT quirk: LR schedule length counted in minibatches, not optimizer steps (see docs/methods.md)
    schedule_in_minibatches: bool = False

    @classmethod
    def attack_needed(cls, options: Any) -> str:
        """'' when this configuration trains without an adversary, else what needs the [attack] table (named in the
        error that refuses a recipe without one). Methods whose answer depends on their options (e.g. a combination
        of methods) override it."""
        return f"method '{cls.name}'" if cls.needs_attack else ""

    @classmethod
    def dual_bn_wanted(cls, options: Any) -> bool:
        """Does this configuration want a dual-BN encoder under [encoder] dual_bn = "auto"?"""
        return cls.wants_dual_bn

    def __init__(self, options: Any, encoder: Encoder, attack: Attack | None, augment: ViewAugment) -> None:
        super().__init__()
        self.encoder = encoder
        self.options = options
        self.attack = attack
        self.augment = augment

    def prepare(self, images: Tensor, total_steps: int) -> None:
        """Called once by the trainer before training (and before a resume restores state), with the training split
        (uint8 [N, C, H, W] on the CPU; a streamed split decodes what is indexed, so index it in slices) and the run's
        optimizer steps: load a teacher, fit pseudo-label clusters, size a momentum schedule. Parameters live on the
        method's device."""

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        """Called before each epoch (1-based); schedules (augmentation strength, loss weights) go here."""

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Return (loss, metrics) for a batch of uint8 images [N, C, H, W] already on the device.

        Metrics are 0-d tensors; the engine reads them asynchronously, so do not call ``.item()``.
        """
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step (e.g. EMA updates of a momentum encoder)."""

    def optimizer_parameters(self) -> list[nn.Parameter]:
        """The parameters the engine's optimizer updates (default: every trainable one). A method that trains part
        of itself with its own optimizer (e.g. an adversary that maximises the loss) leaves those parameters out,
        steps them itself (``after_optimizer_step``) and returns that optimizer's state from ``run_state``."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The engine optimizer's param groups over ``optimizer_parameters`` (torch's format: a dict with ``params``
        and any setting of the recipe's optimizer, e.g. ``weight_decay``, plus ``lr_scale``: the group trains at the
        schedule's LR × lr_scale). Default: one group, every setting from the recipe. A method overrides it to exempt
        some tensors from weight decay or to train one part at another rate."""
        return [{"params": self.optimizer_parameters()}]

    def run_state(self) -> dict[str, Tensor]:
        """Tensors outside the module state that exact resume needs (e.g. free AT's persistent δ, the state of a
        method's own optimizer: see ``rsslctl.runtime.checkpoint.optimizer_tensors``)."""
        return {}

    def load_run_state(self, state: dict[str, Tensor]) -> None:
        """Restore what ``run_state`` returned."""

    def eval_features(self, x: Tensor, route: str) -> Tensor:
        """Features used by evaluation for pixels ``x`` in [0, 1] (bag-of-features methods override it)."""
        return self.eval_encoder().features(x, route)

    def coreset_target(self) -> CoresetTarget | None:
        """What gradient-based coreset selection (RCS) differentiates, or None when the method does not support it
        (random selection still works)."""
        return None

    def eval_encoder(self) -> Encoder:
        """The encoder to export and evaluate (a method with a momentum encoder may return that one)."""
        return self.encoder

    def finetune_row(self) -> str:
        """The row of ``finetune_rows`` fine-tuning uses for this trained instance ('' = the generic defaults)."""
        return next(iter(self.finetune_rows), "")

"""The method interface (solo-learn style): one class per method holding its views and its loss.

A method is an ``nn.Module`` wrapping the encoder (and any extra parts such as a momentum encoder),
so its whole state is checkpointed. The engine calls ``training_step`` once per minibatch.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

from torch import Tensor, nn

from .attack import Attack
from .encoder import Encoder
from .options import NoOptions


class Method(nn.Module):
    """Base class of method plugins."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: does the method need an [attack] section (adversarial training)?
    needs_attack: ClassVar[bool] = False
    #: does the method want a dual-BN encoder when [encoder] dual_bn = "auto"?
    wants_dual_bn: ClassVar[bool] = False
    #: optimizer steps per minibatch; free adversarial training replays each minibatch m times
    replays: int = 1
    #: reference free-AT quirk (METHODS.md §8.3): LR schedule length counted in minibatches, not optimizer steps
    schedule_in_minibatches: bool = False

    def __init__(self, encoder: Encoder, options: Any, attack: Attack | None,
                 augment: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.encoder = encoder
        self.options = options
        self.attack = attack
        self.augment = augment

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        """Called before each epoch (1-based); schedules (augmentation strength, loss weights) go here."""

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Return (loss, metrics) for a batch of uint8 images [N, C, H, W] already on the device.

        Metrics are 0-d tensors; the engine reads them asynchronously, so do not call ``.item()``.
        """
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step (e.g. EMA updates of a momentum encoder)."""

    def run_state(self) -> dict[str, Tensor]:
        """Tensors outside the module state that exact resume needs (e.g. free AT's persistent δ)."""
        return {}

    def load_run_state(self, state: dict[str, Tensor]) -> None:
        """Restore what ``run_state`` returned."""

    def eval_features(self, x: Tensor, route: str) -> Tensor:
        """Features used by evaluation for pixels ``x`` in [0, 1] (bag-of-features methods override it)."""
        return self.eval_encoder().features(x, route)

    def coreset_target(self) -> Any:
        """What gradient-based coreset selection (RCS) differentiates: a ``rsslctl.coreset.CoresetTarget``, or None
        when the method does not support it (random selection still works)."""
        return None

    def eval_encoder(self) -> Encoder:
        """The encoder to export and evaluate (a method with a momentum encoder may return that one)."""
        return self.encoder

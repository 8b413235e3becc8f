"""The teacher of a two-stage method: a frozen encoder taken from a finished run directory.

A method that distils (DeACL) or pseudo-labels (AdvCL) from a pretrained model names that model's run directory in
an option; ``FrozenTeacher`` loads the evaluated encoder of the run's newest checkpoint (exactly as ``rsslctl
evaluate`` loads it) before training, in eval mode and without gradients. The teacher is deliberately *not* a
sub-module of the method: it is not trained, and a trained student is evaluated, exported and fine-tuned without its
teacher. For exact resume its weights travel in the method's run state (``state``/``load_state``), so a resumed run
keeps the teacher it started with even when the teacher's run directory has trained on since.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from rsslctl.base.errors import UserError
from rsslctl.nn.encoder import Encoder

PREFIX = "teacher."


class FrozenTeacher:
    """A frozen teacher encoder loaded from ``run_dir``; ``where`` names the option in error messages."""

    def __init__(self, run_dir: str, where: str) -> None:
        self.run_dir, self.where = str(run_dir), where
        self.encoder: Encoder | None = None

    def load(self, device: torch.device) -> Encoder:
        """Build the teacher from the run's recipe and newest checkpoint onto ``device`` (once)."""
        if self.encoder is not None:
            return self.encoder
        from rsslctl.run.build import load_trained_method
        from rsslctl.run.directory import load_run_recipe
        if not self.run_dir:
            raise UserError(f"{self.where}: this method needs a teacher; set it to the run directory of a finished "
                            "`rsslctl pretrain` run (e.g. a simclr run)")
        path = Path(self.run_dir)
        if not path.is_dir():
            raise UserError(f"{self.where} = {self.run_dir!r}: teacher run directory not found; train the teacher "
                            "first with `rsslctl pretrain`, or fix the path")
        try:
            recipe = load_run_recipe(path)
            # meta tensors (the host-sync test) cannot receive weights: load on the CPU, then move
            method, _, _ = load_trained_method(path, recipe, torch.device("cpu") if device.type == "meta" else device,
                                               "use as a teacher")
        except UserError as exc:
            raise UserError(f"{self.where}: {exc}") from None
        self.encoder = method.eval_encoder().eval().requires_grad_(False).to(device)
        return self.encoder

    def check_compatible(self, student: Encoder, sample: Tensor, same_width: bool) -> None:
        """One clear line when the teacher cannot take the student's images (``sample``: one float image batch), or,
        with ``same_width``, when its feature width differs from the student's."""
        teacher = self.load(sample.device)
        try:
            with torch.no_grad():
                width = teacher.features(sample).shape[1]
        except RuntimeError as exc:
            raise UserError(f"{self.where} = {self.run_dir!r}: the teacher cannot read this recipe's images "
                            f"{tuple(sample.shape[1:])} ({str(exc).splitlines()[0][:120]})") from None
        if same_width and width != student.num_features:
            raise UserError(f"{self.where} = {self.run_dir!r}: the teacher's features have {width} dimensions, the "
                            f"student's backbone {student.num_features}; use the same backbone for both")

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """The teacher's backbone features of pixels ``x`` in [0, 1] (``normal`` BN route, eval mode)."""
        if self.encoder is None:
            raise RuntimeError("teacher used before Method.prepare loaded it")
        return self.encoder.features(x, "normal")

    def state(self) -> dict[str, Tensor]:
        """The teacher's weights for the run state (empty before it is loaded)."""
        if self.encoder is None:
            return {}
        return {PREFIX + k: v for k, v in self.encoder.state_dict().items()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Restore the weights ``state`` saved (a no-op when the run state holds none)."""
        own = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
        if not own:
            return
        if self.encoder is None:
            raise RuntimeError("teacher state restored before Method.prepare loaded the teacher")
        try:
            self.encoder.load_state_dict(own)
        except RuntimeError:
            raise UserError(f"{self.where} = {self.run_dir!r}: the checkpoint's teacher does not match the teacher "
                            "run's model; point the option at the run this one was started with") from None

"""Assembly shared by every command: device and precision, data loading, building a method from a recipe, and
loading a trained one from its run directory. Training itself lives in ``engine``; nothing here trains."""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from rsslctl.base import registry
from rsslctl.base.console import console
from rsslctl.base.errors import UserError
from rsslctl.base.limits import check_allocation
from rsslctl.data.augment import ViewAugment
from rsslctl.data.dataset import Dataset, HostSource, ImageData
from rsslctl.data.stream import StreamSplit, device_memory
from rsslctl.method.base import Method
from rsslctl.nn.encoder import build_encoder
from rsslctl.run.recipe import PLUGIN_TABLES, Recipe
from rsslctl.runtime import agreement, distributed
from rsslctl.runtime.checkpoint import load_latest, refuse_nonfinite


def select_device(name: str, backend: str = "auto") -> torch.device:
    """The device named by engine.device; under torchrun this rank's device, with the process group joined."""
    return distributed.setup(name, backend)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 dot-product instructions (AVX512-BF16 or AMX), where bf16 autocast is ~2x faster;
    elsewhere bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_bf16(device: torch.device, precision: str) -> bool:
    """precision 'auto' = bf16 on CUDA and on CPUs with native bf16, fp32 otherwise."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return precision == "bf16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``uses_bf16``; losses and attack objectives cast themselves back to fp32."""
    if not uses_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def setup_device(recipe: Recipe) -> torch.device:
    """The recipe's device, with its CPU thread count and determinism setting applied."""
    if recipe.engine.threads:
        torch.set_num_threads(recipe.engine.threads)
    if recipe.engine.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
    torch.use_deterministic_algorithms(recipe.engine.deterministic)  # process-wide: the recipe that runs decides
    torch.backends.cudnn.benchmark = False
    e = recipe.engine
    joining = not distributed.active()  # later calls (rank 0 evaluating alone after fine-tuning) gather nothing
    device = distributed.setup(e.device, e.backend, e.join_timeout_s, e.collective_timeout_s)
    if joining:
        agreement.agree(recipe.resolved, _plugin_classes(recipe))  # every rank runs the same recipe, seed and code
    return device


def _read_split(recipe: Recipe, split: str, read: Callable[[Dataset, str], Any]) -> Any:
    """``read(dataset, split)`` through the dataset plugin, downloading first only if the recipe asks."""
    cls = recipe.dataset.cls
    if split not in cls.splits:
        raise UserError(f"data: dataset '{cls.name}' has no split '{split}'; available: {', '.join(cls.splits)}")
    dataset = recipe.dataset.build(Path(recipe.data.root))
    try:
        return read(dataset, split)
    except UserError:
        if not recipe.data.download:
            raise
        console.print(f"[bold]downloading[/] {cls.name} into {Path(recipe.data.root).resolve()}")
        dataset.download()
        return read(dataset, split)


def load_split(recipe: Recipe, split: str, limit: int = 0) -> ImageData:
    """Load a split through the dataset plugin (downloading only if the recipe asks), resized to image_size."""
    data = _read_split(recipe, split, lambda ds, s: ds.load(s))
    if limit:  # cut before resizing: only the images used are brought to image_size
        data = data.subset(torch.arange(min(limit, len(data))))
    size = recipe.data.image_size
    check_allocation(len(data) * data.images.shape[1] * size * size, f"data: {len(data):,} images of split "
                     f"'{split}' at data.image_size = {size}", "lower data.image_size or set data.limit")
    return data.resized(size)


def load_train_split(recipe: Recipe) -> ImageData:
    """The recipe's training split, cut to its first ``data.limit`` images when a limit is set."""
    return load_split(recipe, recipe.data.train_split, recipe.data.limit)


def open_train_split(recipe: Recipe, device: torch.device) -> ImageData | StreamSplit:
    """The training split for the engine: resident (``load_train_split``) or streamed, as ``data.stream`` says;
    ``auto`` streams when the split's uint8 images would exceed ``data.resident_fraction`` of the device's memory.
    Datasets with a per-image reader (``Dataset.source``) are sized without decoding; the others are loaded into
    host memory first and, when streamed, fed to the device from there."""
    d = recipe.data
    if d.stream == "off":
        return load_train_split(recipe)
    budget = device_memory(device) * d.resident_fraction

    def too_big(n: int, channels: int) -> bool:
        return d.stream == "on" or bool(budget) and n * channels * d.image_size ** 2 > budget

    source = _read_split(recipe, d.train_split, lambda ds, s: ds.source(s))
    if source is None:
        data = load_train_split(recipe)
        if not too_big(*data.images.shape[:2]):
            return data
        source = HostSource(data)
    elif not too_big(min(d.limit, len(source)) if d.limit else len(source), source.channels):
        return load_train_split(recipe)
    return StreamSplit(source, d.image_size, d.limit, d.workers, d.decode_on_device)


def build_method(recipe: Recipe, device: torch.device) -> Method:
    """Backbone → encoder → attack → augmentation → method, on ``device`` (channels_last if asked)."""
    method_cls = recipe.method.cls
    encoder = build_encoder(recipe.backbone.build(), recipe.encoder,
                            method_cls.dual_bn_wanted(recipe.method.options))
    attack = recipe.attack.build() if recipe.attack.cls else None
    fmt = torch.channels_last if recipe.engine.channels_last else torch.contiguous_format
    augment = ViewAugment(recipe.data.image_size, recipe.augment, memory_format=fmt)
    method = recipe.method.build(encoder, attack, augment)
    method.to(device=device, memory_format=fmt)
    return method


def compile_step(method: Method, cuda_graphs: bool = False, backend: str = "inductor"
                 ) -> Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]:
    """``method.training_step`` under ``torch.compile``: the attack and the loss compile, augmentation stays eager.

    Graph breaks, by design: the augmentation (its random parameters are drawn on the host per call, so it is
    ``torch.compiler.disable``d), and each attack step's leaf tensor (dynamo cannot return a tensor it called
    ``requires_grad_()`` on, so the attack loops run eagerly and call one compiled graph per step: objective forward,
    input gradient through dynamo's ``trace_autograd_ops``, projected step). What a method does around its attack
    (e.g. ``eval_mode``) may break once more; a graph break never changes results, only what is fused. The loss
    graph's backward is compiled by AOTAutograd and run by the engine's ``loss.backward()``; the optimizer step is
    eager (multi-tensor kernels). ``cuda_graphs`` uses mode ``reduce-overhead``.
    """
    compiled = torch.compile(method.training_step, backend=backend, mode="reduce-overhead" if cuda_graphs else None)
    config = {"trace_autograd_ops": True} if hasattr(torch._dynamo.config, "trace_autograd_ops") else {}

    def step(images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch._dynamo.config.patch(**config):
            return compiled(images, labels)
    return step


def load_trained_method(run_dir: Path, recipe: Recipe, device: torch.device, purpose: str
                        ) -> tuple[Method, Path, dict[str, Any]]:
    """(method with the weights of the run's newest checkpoint, that checkpoint, its meta); ``purpose`` names the
    command in the error raised when the run has no checkpoint yet."""
    found = load_latest(run_dir)
    if found is None:
        raise UserError(f"{run_dir}: no checkpoint to {purpose} yet; run `rsslctl pretrain` first")
    ckpt, model_state, _, meta = found
    refuse_nonfinite(model_state, str(ckpt))
    method = build_method(recipe, device)
    load_weights(method, model_state, ckpt)
    if recipe.engine.compile:  # evaluation and fine-tuning run the backbone many times on fixed shapes
        method.eval_encoder().backbone.compile()
    return method, ckpt, meta


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], ckpt: Path, strict: bool = True) -> None:
    """``module.load_state_dict`` with a one-line error when the checkpoint does not fit the recipe's model."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # wrong shapes
        why = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise UserError(f"{ckpt}: checkpoint does not match the recipe's model ({why})") from None
    if strict and (missing or unexpected):
        raise UserError(f"{ckpt}: checkpoint does not match the recipe's model "
                        f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")


def _plugin_classes(recipe: Recipe) -> dict[type, str]:
    """The plugin classes the recipe uses → 'package version'."""
    out = {}
    for kind, slot_name in PLUGIN_TABLES.values():
        slot = getattr(recipe, slot_name)
        if slot is not None and slot.cls is not None:
            info = registry.registry().info(kind, slot.name)
            out[slot.cls] = f"{kind}:{slot.cls.name} {info.package} {info.version}"
    return out


def plugin_versions(recipe: Recipe) -> dict[str, str]:
    """'kind:name' → 'package version' of every plugin the recipe uses (recorded in checkpoints)."""
    out = {}
    for kind, slot_name in PLUGIN_TABLES.values():
        slot = getattr(recipe, slot_name)
        if slot is not None and slot.cls is not None:
            info = registry.registry().info(kind, slot.name)
            out[f"{kind}:{slot.cls.name}"] = f"{info.package} {info.version}"
    return out

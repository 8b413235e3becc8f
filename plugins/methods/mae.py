"""MAE (He et al., CVPR 2022) on any timm vision transformer, with two optional adversaries.

Per image, a random subset of (1 − r)·L of its L patches is kept (argsort of uniform noise, a different subset per
image); the ViT encoder sees only the kept patches (with their positional embeddings), a light transformer decoder
fills the masked positions with a shared mask token plus its own fixed 2-D sin-cos positional embedding, and the loss
is the mean squared error on the masked patches only, against per-patch normalised pixels (``norm_pix_loss``).
MAE+ (the AdPE authors' baseline, ``mae_plus``): the encoder also takes a learned mask token at every masked position,
and the decoder reads its whole output.

Adversaries (see docs/methods.md, "MAE, adversarial MAE and AdPE"):

* adversarial MIM: with an [attack] table, the attack maximises the reconstruction loss in pixel space (masks fixed,
  target = the clean patches) and the training loss mixes the clean and adversarial reconstruction losses;
  ``contrastive_weight`` adds an NT-Xent term on two views' pooled encoder features (adversarial views when attacked);
* AdPE (Wang et al., 2023): an adversarial token at the masked positions ("embedding") or an adversarial shift of
  the coordinates fed to the sin-cos embedding ("coordinate"). By default as the authors' code: on MAE+ (the encoder
  also takes mask tokens), δ is a parameter that the run's optimizer ascends (its gradient reversed) in the same step
  as the model descends, projected after each step. ``adpe_update = "ascent"`` keeps our earlier formulation:
  sign-gradient ascent each step on the visible patches' positions of a plain MAE.

Evaluation uses the full, unmasked ViT with its own pooling (``encoder.features``).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from rsslctl import Encoder, Method, UserError, eval_mode, fp32, hookimpl, loss_and_grad, multi_view, nt_xent
from rsslctl_plugins.methods.options import CITATION, MAEOptions


def random_masking(n: int, length: int, ratio: float, device: torch.device | str = "cpu"
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking: (ids_keep [n, K], ids_restore [n, L], mask [n, L] with 1 = masked), K = ⌊L(1 − r)⌋.

    Each row draws uniform noise over its L patches and keeps the K with the smallest noise; ``ids_restore`` undoes
    the shuffle (row-wise argsort of the argsort), so kept tokens followed by mask tokens, gathered with it, are back
    in patch order."""
    keep = int(length * (1 - ratio))
    shuffle = torch.rand(n, length, device=device).argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(n, length, device=device)
    mask[:, :keep] = 0
    return shuffle[:, :keep], restore, mask.gather(1, restore)


def patchify(images: Tensor, patch: int) -> Tensor:
    """[N, C, H, W] → [N, L, p·p·C], patches in row-major order (as a ViT's patch embedding flattens them), each
    patch's pixels ordered (row, column, channel)."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True, eps: float = 1e-6) -> Tensor:
    """MAE reconstruction loss (He et al., 2022): ℓ = Σ_{n,l} m_nl · (1/P) Σ_j (ŷ_nlj − t_nlj)² / Σ_{n,l} m_nl.

    ``pred``/``target`` are [N, L, P] patches, ``mask`` [N, L] is 1 on masked patches (the only ones counted). With
    ``norm_pix`` the target of each patch is normalised by its own pixels: t ← (t − mean_j t) / √(var_j t + ε), with
    the unbiased variance (as the authors' code). Computed in fp32.
    """
    with fp32(pred):
        target = target.float()
        if norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + eps).sqrt()
        per_patch = (pred.float() - target).pow(2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()


def sincos_2d(coords: Tensor, dim: int) -> Tensor:
    """Fixed 2-D sin-cos positional embedding of real (row, column) coordinates [L, 2] → [L, dim], as the MAE authors'
    (facebookresearch/mae, util/pos_embed.py): the first half of the channels encodes the column, the second half the
    row, each as [sin(c·ω_k), cos(c·ω_k)] with ω_k = 10000^(−k/(dim/4)). Computed in float64 (as their numpy code) and
    returned in float32, so the table is bit-equal to theirs; float32 where the device has no float64 (MPS)."""
    quarter = dim // 4
    wide = torch.float32 if coords.device.type == "mps" else torch.float64
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=coords.device, dtype=wide) / quarter)
    out = coords.to(wide).flip(-1)[:, :, None] * omega  # [L, (column, row), dim/4]
    return torch.cat([out.sin(), out.cos()], dim=-1).flatten(1).float()


def grid_coords(grid: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """[H·W, 2] (row, column) of each patch, row-major."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device),
                                indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], 1).float()


def reverse_gradient(x: Tensor) -> Tensor:
    """x in the forward pass, −∂/∂x in the backward (2·sg(x) − x, exactly x in floating point): the optimizer that
    descends the model's loss ascends it in a parameter used through this."""
    return 2 * x.detach() - x


# eager loop around a compiled objective + gradient, as rsslctl.adversary.attack's loops: under engine.compile dynamo
# cannot return a tensor it called requires_grad_() on
@torch.compiler.disable(recursive=False)
def box_ascent(objective: Callable[[Tensor], Tensor], start: Tensor, step: float, steps: int, eps: float) -> Tensor:
    """``steps`` steps δ ← clip(δ + step·sign(∂objective/∂δ), −ε, ε) from ``start``; only δ is differentiated."""
    delta = start
    for _ in range(steps):
        _, grad = loss_and_grad(objective, delta.detach().requires_grad_(True))
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
    return delta.detach()


class MAEDecoder(nn.Module):
    """Linear embed → mask tokens + fixed sin-cos positions → ``depth`` transformer blocks → LayerNorm → pixels.
    ``mask_tokens = False`` (MAE+): the encoder already holds a token for every position, so there are none here."""

    def __init__(self, embed_dim: int, grid: tuple[int, int], patch_dim: int, prefix: int, width: int, depth: int,
                 heads: int, mask_tokens: bool = True) -> None:
        super().__init__()
        self.prefix = prefix
        self.embed = nn.Linear(embed_dim, width)
        if mask_tokens:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
            nn.init.normal_(self.mask_token, std=0.02)
        pos = torch.cat([torch.zeros(prefix, width), sincos_2d(grid_coords(grid), width)])
        self.register_buffer("pos", pos[None], persistent=False)  # fixed, rebuilt from the shapes
        layer_norm = functools.partial(nn.LayerNorm, eps=1e-6)  # the authors' norm_layer, in every block and norm
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=layer_norm)
                                      for _ in range(depth)])
        self.norm = layer_norm(width)
        self.pred = nn.Linear(width, patch_dim)
        for m in self.modules():  # the paper's decoder init: Xavier-uniform linear layers, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: Tensor, ids_restore: Tensor | None) -> Tensor:
        """Pixels [N, L, P] from the encoder's tokens: the kept ones, reordered with ``ids_restore``, or (None, MAE+)
        a token for every position already in patch order."""
        x = self.embed(latent)
        if ids_restore is None:
            return self.pred(self.norm(self.blocks(x + self.pos)))[:, self.prefix:]
        n, length = ids_restore.shape
        kept = x[:, self.prefix:]
        full = torch.cat([kept, self.mask_token.expand(n, length - kept.shape[1], -1).to(kept.dtype)], 1)
        full = full.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :self.prefix], full], 1) + self.pos
        return self.pred(self.norm(self.blocks(x)))[:, self.prefix:]


def check_geometry(img_size: tuple[int, ...], patch: int, image_size: int | None) -> None:
    """MAE cuts each image into whole patches and rebuilds it from them: the ViT's patch size must divide its image
    size, and the images the run feeds (data.image_size) must be the size the ViT was built for."""
    if any(side % patch for side in img_size):
        raise UserError(f"backbone: the ViT's patch size {patch} does not divide its image size "
                        f"{'x'.join(map(str, img_size))}, so MAE cannot cut images into whole patches; choose a patch "
                        "size that divides it (backbone.model_kwargs.patch_size / img_size)")
    if image_size is not None and tuple(img_size) != (image_size, image_size):
        raise UserError(f"data.image_size = {image_size}, but the ViT takes {'x'.join(map(str, img_size))} images; "
                        f"set backbone.model_kwargs.img_size = {image_size} (or data.image_size = {img_size[0]})")


class MAE(Method):
    """MAE on a timm ViT; optional pixel-space PGD on the reconstruction (adversarial MIM), contrastive term, AdPE."""

    name = "mae"
    citation = CITATION["mae"]
    Options = MAEOptions
    backbone_kind = "vit"

    @classmethod
    def check_options(cls, o: MAEOptions, where: str = "method") -> None:
        key = where.rpartition(": ")[2]  # the table's own name, for the fixes the messages suggest
        if o.adpe == "coordinate" and not o.sincos_pos_embed:
            raise UserError(f"{where}.adpe = \"coordinate\" perturbs the coordinates of a sin-cos embedding; set "
                            f"{key}.sincos_pos_embed = true or {key}.adpe = \"embedding\"")
        if o.adpe != "off" and o.adpe_update == "joint" and o.mae_plus == "off":
            raise UserError(f"{where}.adpe_update = \"joint\" perturbs the masked positions inside an MAE+ encoder; "
                            f"set {key}.mae_plus = \"auto\" (or \"on\"), or {key}.adpe_update = \"ascent\"")
        if o.adpe != "off" and o.adpe_update == "ascent" and o.mae_plus == "on":
            raise UserError(f"{where}.adpe_update = \"ascent\" perturbs the visible patches of a plain MAE; set "
                            f"{key}.mae_plus = \"auto\" (or \"off\"), or {key}.adpe_update = \"joint\"")
        if o.mask_ratio <= 0:  # the loss averages over the masked patches only: with none it is 0/0 = NaN
            raise UserError(f"{where}.mask_ratio = {o.mask_ratio} masks no patch, so there is nothing to reconstruct "
                            f"and the loss is undefined; use a value in (0, 0.99], e.g. 0.75")
        if o.decoder_width % 4 or o.decoder_width % o.decoder_heads:
            raise UserError(f"{where}.decoder_width = {o.decoder_width} must be a multiple of 4 and of "
                            f"{where}.decoder_heads = {o.decoder_heads}")

    def __init__(self, options: MAEOptions, encoder: Encoder, attack, augment) -> None:
        super().__init__(options, encoder, attack, augment)
        vit = encoder.backbone
        needed = ("patch_embed", "blocks", "norm", "pos_embed", "forward_head", "num_prefix_tokens")
        if any(getattr(vit, a, None) is None for a in needed) or getattr(vit, "dynamic_img_size", False):
            raise UserError(f"method.name = \"mae\" needs a ViT backbone with patch tokens and an absolute positional "
                            f"embedding (e.g. backbone.model = \"vit_tiny_patch16_224\", cifar_stem = false); "
                            f"{type(vit).__name__} has none")
        self.patch = int(vit.patch_embed.patch_size[0])
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.length = self.grid[0] * self.grid[1]
        check_geometry(tuple(int(s) for s in vit.patch_embed.img_size), self.patch, getattr(augment, "size", None))
        keep = int(self.length * (1 - options.mask_ratio))
        if keep < 1:
            raise UserError(f"method.mask_ratio = {options.mask_ratio} keeps no patch of the {self.length}; lower it")
        if keep >= self.length:
            raise UserError(f"method.mask_ratio = {options.mask_ratio} masks none of the {self.length} patches, so "
                            "the loss is undefined; raise it (e.g. 0.75)")
        self.prefix = 0 if vit.no_embed_class else int(vit.num_prefix_tokens)  # pos-embed rows of prefix tokens
        dim = int(vit.embed_dim)
        if options.sincos_pos_embed:
            if dim % 4:
                raise UserError(f"method.sincos_pos_embed: the ViT width {dim} must be a multiple of 4")
            with torch.no_grad():
                vit.pos_embed[:, self.prefix:] = sincos_2d(grid_coords(self.grid), dim)
                vit.pos_embed[:, :self.prefix] = 0
            vit.pos_embed.requires_grad_(False)
        self.joint = options.adpe != "off" and options.adpe_update == "joint"
        self.mae_plus = options.mae_plus == "on" or (options.mae_plus == "auto" and self.joint)
        channels = int(vit.patch_embed.proj.in_channels)
        self.decoder = MAEDecoder(dim, self.grid, self.patch ** 2 * channels, int(vit.num_prefix_tokens),
                                  options.decoder_width, options.decoder_depth, options.decoder_heads,
                                  mask_tokens=not self.mae_plus)
        per = 1 if options.adpe_shared else self.length
        shape = (per, 2) if options.adpe == "coordinate" else (1, per, dim)
        if self.joint:  # the adversary: a zero shift, or a token drawn like a mask token (it replaces the mask token)
            init = torch.zeros(shape) if options.adpe == "coordinate" else torch.randn(shape) * 0.02
            self.adpe_parameter = nn.Parameter(init)
        else:  # the ascent's δ carried between steps (adpe_persistent): run state, not module state
            self.register_buffer("adpe_delta", torch.zeros(shape), persistent=False)
        if self.mae_plus and not (self.joint and options.adpe == "embedding"):
            self.encoder_mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)

    # -- encoder on the visible patches (MAE+: on every position) ---------------------------------
    def patch_positions(self, delta: Tensor | None) -> Tensor:
        """[1, L, D] positional embedding of the patches, perturbed by ``delta`` when AdPE is on."""
        vit = self.encoder.backbone
        pos = vit.pos_embed[:, self.prefix:]
        if delta is None:
            return pos
        if self.options.adpe == "coordinate":
            return sincos_2d(grid_coords(self.grid, pos.device) + delta, pos.shape[-1])[None].to(pos.dtype)
        return pos + delta

    def encode(self, x: Tensor, masks: tuple[Tensor, Tensor, Tensor], delta: Tensor | None = None) -> Tensor:
        """Encoder tokens of pixels ``x`` in [0, 1]: [N, prefix + K, D] of the kept patches, or with MAE+
        [N, prefix + L, D], where each masked position holds the mask token (AdPE embedding: δ) and its positional
        embedding (AdPE coordinate: at the shifted coordinates)."""
        vit, enc = self.encoder.backbone, self.encoder
        tokens = vit.patch_embed((x - enc.mean) / enc.std)
        if self.mae_plus:
            masked = masks[2].bool()[..., None]
            fill = delta if delta is not None and self.options.adpe == "embedding" else self.encoder_mask_token
            pos = vit.pos_embed[:, self.prefix:]
            tokens = torch.where(masked, fill.to(tokens.dtype), tokens)
            moved = self.patch_positions(delta) if delta is not None and self.options.adpe == "coordinate" else pos
            tokens = tokens + torch.where(masked, moved, pos)
        else:
            tokens = tokens + self.patch_positions(delta)
            tokens = tokens.gather(1, masks[0][..., None].expand(-1, -1, tokens.shape[-1]))
        prefix = [t.expand(len(x), -1, -1) for t in (vit.cls_token, getattr(vit, "reg_token", None)) if t is not None]
        if prefix:
            first = torch.cat(prefix, 1)
            tokens = torch.cat([first + vit.pos_embed[:, :self.prefix] if self.prefix else first, tokens], 1)
        return vit.norm(vit.blocks(vit.norm_pre(vit.pos_drop(tokens))))

    def reconstruction(self, x: Tensor, target: Tensor, masks: tuple[Tensor, Tensor, Tensor],
                       delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(MAE loss of input ``x`` against ``target`` patches with fixed ``masks``, encoder tokens)."""
        latent = self.encode(x, masks, delta)
        pred = self.decoder(latent, None if self.mae_plus else masks[1])
        return mae_loss(pred, target, masks[2], self.options.norm_pix_loss), latent

    # -- adversaries ---------------------------------------------------------------------------------
    def adversarial_positions(self, objective: Callable[[Tensor], Tensor]) -> Tensor:
        """AdPE: sign-gradient ascent on ``objective(δ)`` from 0 (or the carried δ), projected onto ‖δ‖∞ ≤ ε; gradients
        are taken w.r.t. δ only."""
        o = self.options
        start = self.adpe_delta if o.adpe_persistent else torch.zeros_like(self.adpe_delta)
        delta = box_ascent(objective, start, o.adpe_step_size, o.adpe_steps, o.adpe_eps)
        if o.adpe_persistent:
            self.adpe_delta.copy_(delta)
        return delta

    def training_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        o, enc = self.options, self.encoder
        x = multi_view(images, self.augment, 2) if o.contrastive_weight else self.augment(images)
        target = patchify(((x - enc.mean) / enc.std).expand(-1, enc.mean.shape[1], -1, -1), self.patch)
        masks = random_masking(len(x), self.length, o.mask_ratio, x.device)
        metrics: dict[str, Tensor] = {}
        delta = None
        if self.joint:
            delta = reverse_gradient(self.adpe_parameter)
            metrics["adpe_delta"] = self.adpe_parameter.detach().abs().max()
        elif o.adpe != "off":
            with eval_mode(self):
                delta = self.adversarial_positions(lambda d: self.reconstruction(x, target, masks, d)[0])
            metrics["adpe_delta"] = delta.abs().max().detach()
        a = o.adversarial_weight if self.attack is not None else 0.0
        loss = torch.zeros((), device=x.device)
        if a < 1:
            loss_rec, latent = self.reconstruction(x, target, masks, delta)
            loss = loss + (1 - a) * loss_rec
            metrics["loss_rec"] = loss_rec.detach()
        if self.attack is not None:
            with eval_mode(self):  # masks (and AdPE's δ) stay fixed during the attack; target = clean patches
                x_adv = self.attack.perturb(x, lambda xa: self.reconstruction(xa, target, masks, delta)[0])
            loss_adv, latent = self.reconstruction(x_adv, target, masks, delta)
            loss = loss + a * loss_adv
            metrics["loss_adv"] = loss_adv.detach()
        if o.contrastive_weight:
            z = enc.head(enc.backbone.forward_head(latent, pre_logits=True))
            loss_con = nt_xent(z, o.temperature)
            loss = loss + o.contrastive_weight * loss_con
            metrics["loss_con"] = loss_con.detach()
        return loss, metrics

    def parameter_groups(self) -> list[dict]:
        """The authors' groups: weight decay on the weights but not on biases and 1-D tensors (unless
        ``decay_biases_and_norms``); the joint AdPE parameter at lr × ``adpe_lr_scale`` with its own weight decay."""
        o, adversary = self.options, getattr(self, "adpe_parameter", None)
        trained = {id(p) for p in self.optimizer_parameters()} - {id(adversary)}
        decay, exempt = [], []
        for name, p in self.named_parameters():
            if id(p) in trained:
                flat = p.ndim <= 1 or name.endswith(".bias")
                (exempt if flat and not o.decay_biases_and_norms else decay).append(p)
        groups: list[dict] = [{"params": decay}] + ([{"params": exempt, "weight_decay": 0.0}] if exempt else [])
        if self.joint:
            groups.append({"params": [adversary], "weight_decay": o.adpe_weight_decay, "lr_scale": o.adpe_lr_scale})
        return groups

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Joint AdPE: project δ back onto its ball, per position (as the authors' optimizer after its ascent)."""
        o = self.options
        if not self.joint or o.adpe_norm == "none":
            return
        rows = self.adpe_parameter.view(-1, self.adpe_parameter.shape[-1])
        if o.adpe_norm == "linf":
            rows.clamp_(-o.adpe_eps, o.adpe_eps)
        else:
            norm = rows.norm(dim=1, keepdim=True)
            rows.mul_(torch.where(norm > o.adpe_eps, o.adpe_eps / norm, torch.ones_like(norm)))

    def run_state(self) -> dict[str, Tensor]:
        return {"adpe_delta": self.adpe_delta} if self.options.adpe_persistent and not self.joint else {}

    def load_run_state(self, state: dict[str, Tensor]) -> None:
        if "adpe_delta" in state:
            self.adpe_delta.copy_(state["adpe_delta"])


@hookimpl
def rsslctl_methods() -> list[type]:
    return [MAE]

"""`rsslctl import --format mae`: the official MAE pretraining checkpoints ({"model": state_dict}).

The file is written by a small re-implementation, in this test, of the authors' model layout (facebookresearch/mae,
models_mae.py: patch_embed.proj, cls_token, pos_embed, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2}, norm, mask_token, decoder_embed, decoder_pos_embed, decoder_blocks.N, decoder_norm, decoder_pred; LayerNorm
eps 1e-6; fixed sin-cos positions with the column half first), at a tiny size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_user_error, evaluate_finetune_export, run
from safetensors.torch import load_file
from torch import nn

from rsslctl.run.build import load_trained_method
from rsslctl.run.directory import load_run_recipe
from rsslctl.runtime.checkpoint import latest_checkpoint, read_meta
from rsslctl_plugins.methods.mae import random_masking

CPU = torch.device("cpu")
IMAGE, PATCH, DIM, DEPTH, HEADS, DEC, DEC_DEPTH, DEC_HEADS = 16, 4, 128, 2, 2, 64, 1, 2
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def sincos_table(dim: int, side: int) -> torch.Tensor:
    """[1, 1 + side², dim]: a zero row (class token), then per patch (row i, column j) [sin jω, cos jω, sin iω, cos iω],
    ω_k = 10000^(−k/(dim/4)), in float64, stored as float32."""
    q = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(q, dtype=np.float64) / q)
    rows = [np.zeros(dim)] + [np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega),
                                              np.cos(i * omega)]) for i in range(side) for j in range(side)]
    return torch.from_numpy(np.stack(rows).astype(np.float32))[None]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AuthorsLayoutMAE(nn.Module):
    """The authors' MaskedAutoencoderViT module tree and forward, re-written small."""

    def __init__(self) -> None:
        super().__init__()
        side = IMAGE // PATCH
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.pos_embed = nn.Parameter(sincos_table(DIM, side), requires_grad=False)
        self.blocks = nn.ModuleList([Block(DIM, HEADS) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(DIM, eps=1e-6)
        self.decoder_embed = nn.Linear(DIM, DEC)
        self.mask_token = nn.Parameter(torch.randn(1, 1, DEC) * 0.02)
        self.decoder_pos_embed = nn.Parameter(sincos_table(DEC, side), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(DEC, DEC_HEADS) for _ in range(DEC_DEPTH)])
        self.decoder_norm = nn.LayerNorm(DEC, eps=1e-6)
        self.decoder_pred = nn.Linear(DEC, PATCH * PATCH * 3)
        with torch.no_grad():  # every weight away from its init, so a misplaced tensor shows
            for name, p in self.named_parameters():
                if "pos_embed" not in name:
                    p.add_(torch.randn_like(p) * 0.1)

    def forward_encoder(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, DIM))
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1), x], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        masked = self.mask_token.repeat(len(x), ids_restore.shape[1] + 1 - x.shape[1], 1)
        rest = torch.gather(torch.cat([x[:, 1:], masked], 1), 1, ids_restore[..., None].expand(-1, -1, DEC))
        x = torch.cat([x[:, :1], rest], 1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def authors_file(tmp_path: Path, name: str = "mae_pretrain.pth", edit=None) -> tuple[Path, AuthorsLayoutMAE]:
    torch.manual_seed(0)
    ref = AuthorsLayoutMAE().eval()
    sd = ref.state_dict()
    if edit:
        edit(sd)
    path = tmp_path / name
    torch.save({"model": sd}, path)  # main_pretrain.py's layout (the released files keep only "model")
    return path, ref


def test_import_maps_every_tensor_and_computes_the_authors_forward(tmp_path: Path) -> None:
    path, ref = authors_file(tmp_path)
    out = tmp_path / "run"
    result = run("import", str(path), "--out", str(out))  # auto: only mae writes this layout
    assert result.exit_code == 0, result.output
    assert "mae" in result.stdout and "decoder" in result.stdout
    ckpt = latest_checkpoint(out)
    model, meta, recipe = load_file(str(ckpt / "model.safetensors")), read_meta(ckpt), load_run_recipe(out)
    for key, value in ref.state_dict().items():
        if key == "decoder_pos_embed":
            continue
        dest = {"mask_token": "decoder.mask_token"}.get(key) or next(
            (ours + key[len(theirs):] for theirs, ours in (("decoder_embed.", "decoder.embed."),
             ("decoder_blocks.", "decoder.blocks."), ("decoder_norm.", "decoder.norm."),
             ("decoder_pred.", "decoder.pred.")) if key.startswith(theirs)), "encoder.backbone." + key)
        assert torch.equal(model[dest], value), key
    r = recipe.resolved
    assert meta["import"]["format"] == "mae" and meta["import"]["container"] == "model"
    assert meta["import"]["dropped"] == ["decoder_pos_embed"]
    assert r["backbone"]["model_kwargs"] == {"img_size": IMAGE, "patch_size": PATCH, "embed_dim": DIM,
                                             "depth": DEPTH, "num_heads": HEADS}
    assert (r["method"]["decoder_width"], r["method"]["decoder_depth"], r["method"]["decoder_heads"]) == (
        DEC, DEC_DEPTH, DEC_HEADS)
    assert r["method"]["name"] == "mae" and r["data"]["image_size"] == IMAGE

    method = load_trained_method(out, recipe, CPU, "test")[0].eval()
    x = torch.rand(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    length = (IMAGE // PATCH) ** 2
    torch.manual_seed(2)
    ids_keep, ids_restore, _ = random_masking(4, length, 0.75)
    with torch.no_grad():
        theirs = ref.forward_encoder((x - MEAN) / STD, torch.arange(length).expand(4, -1))
        assert torch.allclose(method.encoder.features(x), theirs[:, 0], atol=1e-5)  # class token after the norm
        latent = method.encode(x, (ids_keep, ids_restore, _))
        want = ref.forward_encoder((x - MEAN) / STD, ids_keep)
        assert torch.allclose(latent, want, atol=1e-5)
        assert torch.allclose(method.decoder(latent, ids_restore), ref.forward_decoder(want, ids_restore), atol=1e-5)


def test_imported_mae_encoder_evaluates_finetunes_and_exports(tmp_path: Path) -> None:
    path, _ = authors_file(tmp_path)
    out = tmp_path / "mae_run"
    result = run("import", str(path), "--format", "mae", "--out", str(out), "--quiet", "--set", "data.name=digits",
                 "--set", "engine.device=cpu")
    assert result.exit_code == 0, result.output
    exported = evaluate_finetune_export(out)
    assert torch.equal(exported["blocks.1.attn.qkv.weight"], torch.load(path, weights_only=True)["model"][
        "blocks.1.attn.qkv.weight"])


def test_encoder_only_release_imports_with_a_fresh_decoder(tmp_path: Path) -> None:
    def encoder_only(sd: dict) -> None:  # mae_pretrain_vit_*.pth hold the encoder only
        for key in [k for k in sd if k.startswith(("decoder_", "mask_token"))]:
            del sd[key]
    path, ref = authors_file(tmp_path, edit=encoder_only)
    out = tmp_path / "run"
    assert run("import", str(path), "--format", "mae", "--out", str(out), "--quiet").exit_code == 0
    meta = read_meta(latest_checkpoint(out))
    assert "freshly initialised" in meta["import"]["decoder"] and meta["import"]["dropped"] == []
    method = load_trained_method(out, load_run_recipe(out), CPU, "test")[0].eval()
    assert torch.equal(method.encoder.backbone.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)
    assert load_run_recipe(out).resolved["method"]["decoder_width"] == 512  # the shipped mae_imagenet decoder


def test_released_vits_map_onto_timm_models() -> None:
    from rsslctl_plugins.commands.reference_checkpoints import mae_architecture

    def shapes(dim: int, depth: int, patch: int) -> dict:
        meta = {"device": "meta"}
        sd = {"patch_embed.proj.weight": torch.empty(dim, 3, patch, patch, **meta),
              "pos_embed": torch.empty(1, 1 + (224 // patch) ** 2, dim, **meta),
              "blocks.0.mlp.fc1.weight": torch.empty(4 * dim, dim, **meta)}
        sd.update({f"blocks.{i}.attn.qkv.weight": torch.empty(3 * dim, dim, **meta) for i in range(depth)})
        return sd
    for (dim, depth, patch), model in {(768, 12, 16): "vit_base_patch16_224", (1024, 24, 16): "vit_large_patch16_224",
                                       (1280, 32, 14): "vit_huge_patch14_224"}.items():
        table, decoder, image = mae_architecture(shapes(dim, depth, patch), "f")
        assert table == {"name": "timm", "model": model, "cifar_stem": False} and decoder == {} and image == 224


def _drop(key: str):
    return lambda sd: sd.pop(key)


def _set(key: str, value: torch.Tensor):
    return lambda sd: sd.__setitem__(key, value)


def _row_first(sd: dict) -> None:  # the decoder table with the row half first: not the authors' table
    t = sd["decoder_pos_embed"]
    sd["decoder_pos_embed"] = torch.cat([t[..., DEC // 2:], t[..., :DEC // 2]], -1)


@pytest.mark.parametrize("edit, fragments", [
    (_drop("blocks.1.norm2.bias"), ["no weights for 'encoder.backbone.blocks.1.norm2.bias'"]),
    (_set("blocks.0.attn.qkv.weight", torch.zeros(3 * DIM - 1, DIM)), ["'blocks.0.attn.qkv.weight' has shape"]),
    (_set("pos_embed", torch.zeros(1, 15, DIM)), ["pos_embed (1, 15, 128)", "square"]),
    (_drop("blocks.1.attn.qkv.weight"), ["no weights for 'encoder.backbone.blocks.1.attn.qkv.weight'"]),
    (lambda sd: sd.update({k.replace("blocks.1.", "blocks.3."): sd.pop(k)
                           for k in list(sd) if k.startswith("blocks.1.")}),
     ["transformer blocks blocks.[0, 3]"]),
    (_set("head.weight", torch.zeros(10, DIM)), ["fine-tuned MAE classifier", "rsslctl finetune"]),
    (_row_first, ["decoder_pos_embed is not the fixed 2-D sin-cos table"]),
    (_set("blocks.0.extra.weight", torch.zeros(2)), ["'blocks.0.extra.weight' does not map"]),
])
def test_bad_mae_files_are_one_line_exit_2(tmp_path: Path, edit, fragments: list[str]) -> None:
    path, _ = authors_file(tmp_path, edit=edit)
    assert_user_error(run("import", str(path), "--format", "mae", "--out", str(tmp_path / "r")), *fragments)
    assert not (tmp_path / "r").exists()


def test_not_a_checkpoint_and_unsafe_training_files(tmp_path: Path) -> None:
    text = tmp_path / "mae.pth"
    text.write_text("not a checkpoint")
    assert_user_error(run("import", str(text), "--format", "mae", "--out", str(tmp_path / "r")),
                      "not a readable PyTorch checkpoint")
    import argparse
    _, ref = authors_file(tmp_path)
    path = tmp_path / "checkpoint-799.pth"  # main_pretrain.py's own checkpoints also pickle args (a Namespace)
    torch.save({"model": ref.state_dict(), "epoch": 799, "args": argparse.Namespace(lr=1.5e-4)}, path)
    assert_user_error(run("import", str(path), "--format", "mae", "--out", str(tmp_path / "r")),
                      "refusing to load", "argparse.Namespace")
    torch.save({"model": {"conv1.weight": torch.zeros(8, 3, 3, 3)}}, path)
    assert_user_error(run("import", str(path), "--format", "mae", "--out", str(tmp_path / "r")),
                      "unrecognised key layout", "MAE (patch_embed.*")
    assert not (tmp_path / "r").exists()

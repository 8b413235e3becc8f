"""MAE equals the authors' model (facebookresearch/mae: util/pos_embed.py, models_mae.py) where weights must be
interchangeable: the fixed 2-D sin-cos table (column half first, float64 then float32) and LayerNorm eps 1e-6 in
every encoder and decoder block and in both final norms."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from rsslctl.run.build import build_method
from rsslctl.run.recipe import load
from rsslctl_plugins.methods.mae import grid_coords, sincos_2d

VIT = ["method.name='mae'", "backbone.model='vit_tiny_patch16_224'", "backbone.cifar_stem=false",
       "backbone.model_kwargs={img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2}",
       "encoder.head_layers=0", "method.decoder_width=16", "method.decoder_depth=2", "method.decoder_heads=2",
       "attack.name='none'"]


def table_from_the_formula(dim: int, side: int) -> np.ndarray:
    """[side², dim]: patch l = (row i, column j) row-major; channels [sin(jω), cos(jω), sin(iω), cos(iω)],
    ω_k = 10000^(−k/(dim/4)), k < dim/4, evaluated in float64 and rounded once to float32."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows = []
    for i in range(side):
        for j in range(side):
            rows.append(np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)]))
    return np.stack(rows).astype(np.float32)


def test_sincos_table_is_the_authors_column_first_table() -> None:
    for dim, side in ((8, 3), (32, 4), (768, 14)):
        ours = sincos_2d(grid_coords((side, side)), dim).numpy()
        assert ours.dtype == np.float32
        assert np.array_equal(ours, table_from_the_formula(dim, side)), (dim, side)
    # the column half comes first: along a row (fixed i), only the first dim/2 channels change
    emb = sincos_2d(grid_coords((1, 3)), 8)
    assert not torch.equal(emb[0, :4], emb[1, :4]) and torch.equal(emb[0, 4:], emb[1, 4:])


def test_encoder_and_decoder_positions_and_every_layernorm(tiny_recipe: Path) -> None:
    torch.manual_seed(0)
    method = build_method(load(tiny_recipe, VIT), torch.device("cpu"))
    vit, decoder = method.encoder.backbone, method.decoder
    # models_mae.py: pos_embed = [0 (class token); table], decoder_pos_embed likewise at the decoder width
    want = np.concatenate([np.zeros((1, 32), np.float32), table_from_the_formula(32, 4)])
    assert np.array_equal(vit.pos_embed[0].detach().numpy(), want) and not vit.pos_embed.requires_grad
    want = np.concatenate([np.zeros((1, 16), np.float32), table_from_the_formula(16, 4)])
    assert np.array_equal(decoder.pos[0].numpy(), want)
    norms = {
        "encoder blocks": [m for b in vit.blocks for m in (b.norm1, b.norm2)],
        "encoder norm": [vit.norm],
        "decoder blocks": [m for b in decoder.blocks for m in (b.norm1, b.norm2)],
        "decoder norm": [decoder.norm],
    }
    for where, found in norms.items():
        assert found and all(isinstance(m, nn.LayerNorm) and m.eps == 1e-6 for m in found), where
    all_norms = [m for m in method.modules() if isinstance(m, nn.LayerNorm)]
    assert len(all_norms) == sum(len(v) for v in norms.values()) and {m.eps for m in all_norms} == {1e-6}

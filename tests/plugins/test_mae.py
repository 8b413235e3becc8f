"""MAE on a tiny ViT: loss, masking, patch order, the visible-patch encoder, both adversaries, exact resume, ViT
support of the core (dual BN refusal, AdamW)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONES, final_checkpoint, kill_and_resume, train_run

from rsslctl.base.errors import UserError
from rsslctl.eval.store import load_all
from rsslctl.nn.optim import make_optimizer
from rsslctl.run.build import build_method
from rsslctl.run.recipe import load
from rsslctl.train.engine import Trainer
from rsslctl_plugins.methods.mae import grid_coords, mae_loss, patchify, random_masking, sincos_2d

VIT = ["method.name='mae'", *TINY_BACKBONES["vit"], "encoder.head_layers=0", "method.decoder_width=32",
       "method.decoder_depth=1", "attack.name='none'"]


def _mae(tiny_recipe: Path, extra: list[str] = ()):
    torch.manual_seed(0)
    return build_method(load(tiny_recipe, VIT + list(extra)), torch.device("cpu")).float()


def test_mae_loss_matches_the_formula_written_out() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(3, 5, 12), torch.rand(3, 5, 12)
    mask = (torch.rand(3, 5) > 0.5).float()
    mask[0, 0] = 1
    for norm_pix in (True, False):
        num, den = 0.0, 0.0
        for n in range(3):
            for patch in range(5):
                t = target[n, patch].tolist()
                if norm_pix:
                    mu = sum(t) / len(t)
                    var = sum((v - mu) ** 2 for v in t) / (len(t) - 1)
                    t = [(v - mu) / math.sqrt(var + 1e-6) for v in t]
                err = sum((p - v) ** 2 for p, v in zip(pred[n, patch].tolist(), t)) / len(t)
                num += float(mask[n, patch]) * err
                den += float(mask[n, patch])
        assert float(mae_loss(pred, target, mask, norm_pix)) == pytest.approx(num / den, rel=1e-5)


def test_masking_keeps_exactly_the_requested_count_per_sample() -> None:
    torch.manual_seed(0)
    keep, restore, mask = random_masking(6, 16, 0.75, "cpu")
    assert keep.shape == (6, 4) and mask.shape == (6, 16)
    assert torch.equal(mask.sum(1), torch.full((6,), 12.0))  # (1 − r)·L = 4 kept, 12 masked, in every row
    for n in range(6):  # the kept ids are exactly the unmasked positions, without repeats
        assert sorted(keep[n].tolist()) == torch.nonzero(mask[n] == 0).flatten().tolist()
    assert len({tuple(sorted(k.tolist())) for k in keep}) > 1  # a different subset per sample
    tokens = torch.arange(16.0).repeat(6, 1)  # kept tokens + placeholders, gathered with restore, are back in order
    full = torch.cat([tokens.gather(1, keep), torch.full((6, 12), -1.0)], 1).gather(1, restore)
    assert torch.equal(full >= 0, mask == 0) and torch.equal(full[mask == 0], tokens[mask == 0])
    assert random_masking(2, 10, 0.5, "cpu")[0].shape == (2, 5)


def test_patchify_order_is_the_vit_token_order(tiny_recipe: Path) -> None:
    vit = _mae(tiny_recipe).encoder.backbone
    x = torch.rand(2, 3, 16, 16)
    proj = vit.patch_embed.proj  # a p×p stride-p conv = one linear map per patch, pixels ordered (c, row, column)
    w = proj.weight.permute(0, 2, 3, 1).reshape(proj.out_channels, -1)  # → (row, column, channel) as patchify
    expected = patchify(x, 4) @ w.t() + proj.bias
    assert torch.allclose(vit.patch_embed(x), expected, atol=1e-5)
    assert patchify(x, 4)[0, 1, :3].tolist() == x[0, :, 0, 4].tolist()  # patch 1 starts at row 0, column 4


def test_sincos_embedding_follows_its_formula_and_replaces_the_learned_one(tiny_recipe: Path) -> None:
    coords = grid_coords((2, 3))
    assert coords.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    emb = sincos_2d(coords, 8)
    for pos, (r, c) in enumerate(coords.tolist()):
        want = [math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100),  # column half first (authors')
                math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100)]
        assert emb[pos].tolist() == pytest.approx(want, abs=1e-6)
    vit = _mae(tiny_recipe).encoder.backbone
    assert torch.allclose(vit.pos_embed[0, 1:], sincos_2d(grid_coords((4, 4)), 32)) and not vit.pos_embed.requires_grad
    assert _mae(tiny_recipe, ["method.sincos_pos_embed=false"]).encoder.backbone.pos_embed.requires_grad


def test_encoder_on_all_patches_equals_the_vits_own_forward(tiny_recipe: Path) -> None:
    method = _mae(tiny_recipe).eval()
    vit, enc = method.encoder.backbone, method.encoder
    x = torch.rand(2, 3, 16, 16)
    keep = torch.arange(16).repeat(2, 1)
    full = vit.forward_features((x - enc.mean) / enc.std)
    assert torch.allclose(method.encode(x, (keep, keep, torch.zeros(2, 16))), full, atol=1e-5)
    assert torch.allclose(method.eval_features(x, "normal"), vit.forward_head(full, pre_logits=True), atol=1e-5)


def test_masked_patches_only_drive_the_loss(tiny_recipe: Path) -> None:
    method = _mae(tiny_recipe).eval()
    x = torch.rand(2, 3, 16, 16)
    keep, restore, mask = random_masking(2, 16, 0.75, "cpu")
    target = torch.randn(2, 16, 48)
    loss, _ = method.reconstruction(x, target, (keep, restore, mask))
    changed = target.clone()
    changed[mask == 0] += 5.0  # visible patches' targets do not count
    assert torch.equal(method.reconstruction(x, changed, (keep, restore, mask))[0], loss)
    x2 = x.clone()  # masked pixels are never seen by the encoder: changing them leaves the prediction unchanged
    m = mask[0].view(4, 4).repeat_interleave(4, 0).repeat_interleave(4, 1).bool()
    x2[0, :, m] = torch.rand(3, int(m.sum()))
    assert torch.allclose(method.reconstruction(x2, target, (keep, restore, mask))[0], loss, atol=1e-6)


def test_pixel_adversary_raises_the_reconstruction_loss_within_its_ball(tiny_recipe: Path) -> None:
    method = _mae(tiny_recipe, ["attack.name='pgd'", "attack.steps=3", "attack.eps=0.1", "attack.step_size=0.05"])
    x = torch.rand(4, 3, 16, 16)
    target = torch.randn(4, 16, 48)
    masks = random_masking(4, 16, 0.5, "cpu")
    objective = lambda xa: method.reconstruction(xa, target, masks)[0]  # noqa: E731
    adv = method.attack.perturb(x, objective)
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert float(objective(adv).detach()) > float(objective(x).detach())
    assert all(p.grad is None for p in method.parameters())  # input gradients only
    loss, metrics = method.training_step((torch.rand(8, 3, 16, 16) * 255).to(torch.uint8), torch.zeros(8))
    assert {"loss_rec", "loss_adv"} <= set(metrics)
    assert float(loss.detach()) == pytest.approx(0.5 * float(metrics["loss_rec"]) + 0.5 * float(metrics["loss_adv"]),
                                                 rel=1e-5)


def test_contrastive_term_is_added_with_its_weight(tiny_recipe: Path) -> None:
    method = _mae(tiny_recipe, ["method.contrastive_weight=0.3", "encoder.head_layers=1"])
    loss, metrics = method.training_step((torch.rand(8, 3, 16, 16) * 255).to(torch.uint8), torch.zeros(8))
    assert float(loss.detach()) == pytest.approx(float(metrics["loss_rec"]) + 0.3 * float(metrics["loss_con"]),
                                                 rel=1e-5)
    assert float(metrics["loss_con"]) > 0


@pytest.mark.parametrize("mode", ["embedding", "coordinate"])
def test_adpe_raises_the_loss_and_respects_its_bound(tiny_recipe: Path, mode: str) -> None:
    method = _mae(tiny_recipe, [f"method.adpe='{mode}'", "method.adpe_update='ascent'", "method.adpe_shared=false",
                                "method.adpe_eps=0.3", "method.adpe_step_size=0.2", "method.adpe_steps=3"]).eval()
    x = torch.rand(4, 3, 16, 16)
    target = patchify((x - method.encoder.mean) / method.encoder.std, 4)
    masks = random_masking(4, 16, 0.5, "cpu")
    objective = lambda d: method.reconstruction(x, target, masks, d)[0]  # noqa: E731
    delta = method.adversarial_positions(objective)
    assert delta.shape == ((16, 2) if mode == "coordinate" else (1, 16, 32))
    assert delta.abs().max() <= 0.3 + 1e-6 and delta.abs().max() > 0
    assert float(objective(delta).detach()) > float(objective(torch.zeros_like(delta)).detach())
    assert all(p.grad is None for p in method.parameters())  # gradients w.r.t. δ only
    assert torch.equal(method.adpe_delta, torch.zeros_like(delta))  # not persistent: nothing carried over


def test_persistent_adpe_resumes_exactly(tiny_recipe: Path, tmp_path: Path) -> None:
    extra = VIT + ["method.adpe='coordinate'", "method.adpe_update='ascent'", "method.adpe_shared=false",
                   "method.adpe_persistent=true", "method.adpe_step_size=0.05",
                   "method.adpe_eps=0.3", "schedule.epochs=3", "data.limit=48", "schedule.batch_size=16",
                   "optimizer.name='adamw'", "optimizer.lr=0.001"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    train_run(load(tiny_recipe, extra), full)

    def delta_saved(run: Path) -> None:
        assert final_checkpoint(run)[1]["method.adpe_delta"].abs().max() > 0

    kill_and_resume(load(tiny_recipe, extra), broken, 7, reference=full, before_resume=delta_saved)  # mid epoch 3
    assert torch.equal(final_checkpoint(full)[1]["method.adpe_delta"], final_checkpoint(broken)[1]["method.adpe_delta"])


def _authors_mae_plus_loss(method, x: torch.Tensor, masks: tuple, mode: str, adversary: torch.Tensor | None
                           ) -> torch.Tensor:
    """MAE+ with AdPE written out in the AdPE authors' order (model/ad_ape.py): embed, keep the visible tokens, append
    mask tokens (embedding mode: the adversarial token), unshuffle, add the positions (coordinate mode: the masked
    ones at shifted coordinates, ``adversary`` = (column, row) shift), class token, blocks; the decoder reads every
    token; the loss on the masked patches against per-patch standardised pixels."""
    vit, enc, dec = method.encoder.backbone, method.encoder, method.decoder
    ids_keep, ids_restore, mask = masks
    pixels = (x - enc.mean) / enc.std
    t = vit.patch_embed(pixels)
    n, length, dim = t.shape
    kept = torch.gather(t, 1, ids_keep[..., None].repeat(1, 1, dim))
    token = adversary if mode == "embedding" else method.encoder_mask_token
    t = torch.cat([kept, token.repeat(n, length - kept.shape[1], 1)], 1)
    t = torch.gather(t, 1, ids_restore[..., None].repeat(1, 1, dim))
    pos = vit.pos_embed[:, 1:]
    if mode == "coordinate":
        omega = 1.0 / 10000 ** (torch.arange(dim // 4).float() / (dim // 4))
        side = int(length ** 0.5)
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        halves = [(c.reshape(-1) + a)[:, None] * omega for c, a in ((cols, adversary[0]), (rows, adversary[1]))]
        moved = torch.cat([f(h) for h in halves for f in (torch.sin, torch.cos)], 1)
        m = mask[..., None]
        t = t + moved * m + (1 - m) * pos
    else:
        t = t + pos
    t = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(n, -1, -1), t], 1)
    z = vit.norm(vit.blocks(t))
    pred = dec.pred(dec.norm(dec.blocks(dec.embed(z) + dec.pos)))[:, 1:]
    target = patchify(pixels, 4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


@pytest.mark.parametrize("mode", ["off", "embedding", "coordinate"])
def test_mae_plus_and_joint_adpe_compute_the_authors_loss(tiny_recipe: Path, mode: str) -> None:
    method = _mae(tiny_recipe, [f"method.adpe='{mode}'", "method.mae_plus='on'"]).eval()
    assert method.mae_plus and method.joint == (mode != "off") and not hasattr(method.decoder, "mask_token")
    x = torch.rand(2, 3, 16, 16)
    masks = random_masking(2, 16, 0.75, "cpu")
    target = patchify((x - method.encoder.mean) / method.encoder.std, 4)
    adversary, delta = None, None
    if mode == "coordinate":
        delta = torch.tensor([[0.3, -0.7]])  # ours: (row, column)
        adversary = torch.tensor([-0.7, 0.3])  # theirs: (column, row)
    elif mode == "embedding":
        delta = adversary = method.adpe_parameter.detach()
        assert delta.shape == (1, 1, 32) and not hasattr(method, "encoder_mask_token")
    with torch.no_grad():
        ours = method.reconstruction(x, target, masks, delta)[0]
        theirs = _authors_mae_plus_loss(method, x, masks, mode, adversary)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_joint_adpe_ascends_in_the_step_that_descends_the_model(tiny_recipe: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import rsslctl_plugins.methods.mae as mae
    from rsslctl.train.step import optimizer_step
    method = _mae(tiny_recipe, ["method.adpe='coordinate'", "method.adpe_lr_scale=0.5", "optimizer.name='adamw'",
                                "optimizer.weight_decay=0.05"])
    images = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)
    labels = torch.zeros(4)

    def gradients() -> dict[str, torch.Tensor]:
        method.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        method.training_step(images, labels)[0].backward()
        return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}

    reversed_ = gradients()
    with monkeypatch.context() as m:
        m.setattr(mae, "reverse_gradient", lambda t: t)
        plain = gradients()
    assert reversed_.keys() == plain.keys() and plain["adpe_parameter"].abs().min() > 0
    torch.testing.assert_close(reversed_["adpe_parameter"], -plain["adpe_parameter"])  # δ's gradient reversed ...
    assert all(torch.equal(reversed_[k], plain[k]) for k in plain if k != "adpe_parameter")  # ... and nothing else's

    groups = method.parameter_groups()  # weights decay; biases and 1-D tensors don't; δ at half the LR, no decay
    assert [g.get("weight_decay") for g in groups] == [None, 0.0, 0.0] and groups[2]["lr_scale"] == 0.5
    names = {id(p): n for n, p in method.named_parameters()}
    assert all(p.ndim > 1 and not names[id(p)].endswith(".bias") for p in groups[0]["params"])
    assert all(p.ndim <= 1 or names[id(p)].endswith(".bias") for p in groups[1]["params"]) and groups[1]["params"]
    recipe = load(tiny_recipe, VIT + ["optimizer.name='adamw'", "optimizer.weight_decay=0.05"])
    optimizer = make_optimizer(groups, recipe.optimizer)
    before = method.adpe_parameter.detach().clone()
    torch.manual_seed(3)
    optimizer_step(lambda: method.training_step(images, labels), optimizer, [p for g in groups for p in g["params"]],
                   torch.device("cpu"), "fp32", lr=0.01)
    # AdamW's first step moves each entry by lr·g/(|g| + eps): δ along +sign(∂L/∂δ), at lr × 0.5
    torch.testing.assert_close(method.adpe_parameter.detach() - before, 0.005 * plain["adpe_parameter"].sign(),
                               atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("norm", ["none", "linf", "l2"])
@pytest.mark.parametrize("mode", ["embedding", "coordinate"])
def test_joint_adpe_is_projected_per_position_after_each_step(tiny_recipe: Path, mode: str, norm: str) -> None:
    method = _mae(tiny_recipe, [f"method.adpe='{mode}'", f"method.adpe_norm='{norm}'", "method.adpe_eps=0.4",
                                "method.adpe_shared=false"])
    big = torch.randn_like(method.adpe_parameter) * 3
    big.view(-1, big.shape[-1])[0] = 0.01  # a position already inside the ball stays as it is
    with torch.no_grad():
        method.adpe_parameter.copy_(big)
    method.after_optimizer_step()
    rows, was = method.adpe_parameter.detach().view(-1, big.shape[-1]), big.view(-1, big.shape[-1])
    assert rows.shape[0] == 16
    if norm == "none":
        assert torch.equal(rows, was)
    elif norm == "linf":
        torch.testing.assert_close(rows, was.clamp(-0.4, 0.4))
    else:
        torch.testing.assert_close(rows[1:].norm(dim=1), torch.full((15,), 0.4))
        torch.testing.assert_close(rows[1:], was[1:] / was[1:].norm(dim=1, keepdim=True) * 0.4)
    torch.testing.assert_close(rows[0], was[0])


def test_joint_adpe_resumes_exactly(tiny_recipe: Path, tmp_path: Path) -> None:
    extra = VIT + ["method.adpe='coordinate'", "method.adpe_norm='linf'", "method.adpe_eps=0.3",
                   "method.adpe_persistent=true",  # an ascent option: no effect on the joint update
                   "schedule.epochs=2", "data.limit=48", "schedule.batch_size=16", "optimizer.name='adamw'",
                   "optimizer.lr=0.001"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    train_run(load(tiny_recipe, extra), full)
    weights = final_checkpoint(full)[0]
    assert weights[next(k for k in weights if k.endswith("adpe_parameter"))].abs().max() > 0
    kill_and_resume(load(tiny_recipe, extra), broken, 4, reference=full, state_prefix="optim.")


@pytest.mark.parametrize(("sets", "says"), [
    (["method.adpe='coordinate'", "method.mae_plus='off'"], "perturbs the masked positions inside an MAE+ encoder"),
    (["method.adpe='embedding'", "method.adpe_update='ascent'", "method.mae_plus='on'"],
     "perturbs the visible patches of a plain MAE"),
])
def test_adpe_forms_refuse_the_other_encoder(tiny_recipe: Path, sets: list[str], says: str) -> None:
    with pytest.raises(UserError, match=re.escape(says)) as refused:
        load(tiny_recipe, VIT + sets)
    assert str(refused.value).count(str(tiny_recipe)) == 1


def test_mae_refuses_a_backbone_without_patch_tokens(tiny_recipe: Path) -> None:
    with pytest.raises(UserError, match="needs a ViT backbone"):
        build_method(load(tiny_recipe, ["method.name='mae'", "attack.name='none'", "encoder.head_layers=0"]), "cpu")
    with pytest.raises(UserError, match="sincos_pos_embed"):
        load(tiny_recipe, VIT + ["method.adpe='coordinate'", "method.sincos_pos_embed=false"])


def test_dual_bn_is_refused_on_a_vit_and_auto_falls_back(tiny_recipe: Path, capsys) -> None:
    vit = VIT[1:4] + ["method.name='acl'"]
    with pytest.raises(UserError, match="no BatchNorm layer"):
        build_method(load(tiny_recipe, vit + ["encoder.dual_bn='on'"]), torch.device("cpu"))
    method = build_method(load(tiny_recipe, vit), torch.device("cpu"))  # "auto" with ACL, which wants dual BN
    assert not method.encoder.dual_bn and "no BatchNorm layer" in capsys.readouterr().err.replace("\n", "")
    assert build_method(load(tiny_recipe), torch.device("cpu")).encoder.dual_bn  # the CIFAR ResNet path keeps it


def test_adamw_takes_the_recipes_betas_and_decoupled_weight_decay(tiny_recipe: Path) -> None:
    recipe = load(tiny_recipe, ["optimizer.name='adamw'", "optimizer.betas=[0.9, 0.95]", "optimizer.weight_decay=0.05"])
    opt = make_optimizer([torch.nn.Parameter(torch.ones(3))], recipe.optimizer)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["weight_decay"] == 0.05


def test_a_vit_encoder_pretrains_evaluates_finetunes_and_exports_like_any_backbone(tiny_recipe: Path,
                                                                                   tmp_path: Path) -> None:
    import importlib.util
    import json

    import timm
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from rsslctl.cli import main
    from rsslctl.train.classify import load_classifier

    def run(*args: str):
        result = CliRunner().invoke(main, list(args))
        assert result.exit_code == 0, result.output
        return result

    run_dir = tmp_path / "run"
    sets = [a for o in VIT + ["schedule.epochs=1", "evaluation.epochs=2", "evaluation.steps=1"] for a in ("--set", o)]
    run("pretrain", str(tiny_recipe), "--run-dir", str(run_dir), "--quiet", *sets)
    run("evaluate", str(run_dir), "--set", "evaluation.limit=16")
    assert 0 <= load_all(run_dir)[0][1]["clean_accuracy"] <= 1
    common = ["--epochs", "1", "--batch-size", "32", "--train-steps", "1", "--pgd-steps", "1", "--test-limit", "16",
              "--eps-curve", "", "--set", "data.limit=32", "--quiet"]
    run("finetune", str(run_dir), "--mode", "ALL", *common)
    aff = json.loads((run_dir / "finetune" / "AFF" / "config.json").read_text())
    assert aff["dual_bn_trained"] is False  # no BN, so AFF trains a single route
    run("export", str(run_dir))
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=4, embed_dim=32, depth=1,
                            num_heads=2)
    vit.load_state_dict(load_file(run_dir / "encoder.safetensors"))  # strict: the exported keys are timm's own
    ext = tmp_path / "ext"  # the exported ViT as an external encoder: its metadata rebuilds the model
    run("finetune", "--weights", str(run_dir / "encoder.safetensors"), "--out", str(ext), "--mode", "SLF",
        "--set", "data.image_size=16", *common)
    assert len(list((ext / "evaluation").glob("*/SLF.json"))) == 1
    run("export", str(run_dir), "--classifier", "AFF")
    spec = importlib.util.spec_from_file_location("clf_vit", run_dir / "classifier_AFF.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    outside = module.load_model(str(run_dir / "classifier_AFF.safetensors"))
    inside, _ = load_classifier(run_dir / "finetune" / "AFF", torch.device("cpu"))
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(outside(x), inside(x), atol=1e-5)


@pytest.mark.slow
def test_compiled_adversarial_mae_with_adpe_steps_like_eager(tiny_recipe: Path, tmp_path: Path) -> None:
    """engine.compile: the pixel attack, AdPE's ascent loop and the carried δ give what the eager step gives."""
    from rsslctl.run.build import compile_step
    recipe = load(tiny_recipe, VIT + ["attack.name='pgd'", "attack.steps=2", "method.adpe='coordinate'",
                                      "method.adpe_update='ascent'", "method.adpe_persistent=true", "data.limit=32",
                                      "schedule.batch_size=8",
                                      "engine.precision='fp32'"])
    eager, compiled = (Trainer(recipe, tmp_path / tag, quiet=True) for tag in ("eager", "compiled"))
    compiled.method.load_state_dict(eager.method.state_dict())
    torch._dynamo.reset()
    losses = {}
    for tag, trainer, step in (("eager", eager, eager.method.training_step),
                               ("compiled", compiled, compile_step(compiled.method, backend="aot_eager"))):
        images, labels = trainer.train.images[:8], trainer.train.labels[:8]
        trainer.method.train()
        torch.manual_seed(0)
        losses[tag] = []
        for _ in range(2):
            loss, _ = step(images, labels)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()
            losses[tag].append(loss.detach())
    torch._dynamo.reset()
    torch.testing.assert_close(losses["compiled"], losses["eager"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(compiled.method.adpe_delta, eager.method.adpe_delta)
    assert eager.method.adpe_delta.abs().max() > 0


# -- recipe-time refusals: `recipe show` and `pretrain` refuse alike, in one line, before any directory exists -------

_KWARGS = "backbone.model_kwargs={{img_size={img}, patch_size={patch}, embed_dim=32, depth=1, num_heads=2}}"


@pytest.mark.parametrize("extra, fragments", [
    ([_KWARGS.format(img=16, patch=5)], ("patch size 5 does not divide", "16x16", "patch_size")),
    ([_KWARGS.format(img=15, patch=5)], ("data.image_size = 16", "15x15", "img_size = 16")),
    (["method.mask_ratio=0"], ("method.mask_ratio = 0", "masks no patch", "e.g. 0.75")),
    (["method.mask_ratio=1e-17"], ("masks none of the 16 patches",)),
])
def test_unusable_patch_geometry_and_mask_ratio_are_refused_by_recipe_show_and_pretrain(
        tiny_recipe: Path, tmp_path: Path, extra: list[str], fragments: tuple[str, ...]) -> None:
    from cli_helpers import assert_user_error, run
    sets = [a for s in VIT + ["schedule.epochs=1"] + extra for a in ("--set", s)]
    for verb in ("recipe show", "pretrain"):
        result = run(*verb.split(), str(tiny_recipe), *sets, *(["--quiet"] if verb == "pretrain" else []))
        assert_user_error(result, *fragments)
        assert "internal error" not in result.stderr
    assert not (tmp_path / "runs").exists()  # refused before the run directory was created

"""Every built-in method's options and its lazy declaration, torch-free: listing, citing and validating a
recipe read them without importing the modules that implement the methods (imported when a run needs them)."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from rsslctl import AdvTrainingOptions, Declared, Number, hookimpl, opt


@dataclasses.dataclass
class ACLOptions:
    variant: Literal["ds", "a2a", "a2s"] = opt("ds", "ds: clean pair (normal BN) + adversarial pair (pgd BN); "
                                                     "a2a: adversarial pair only; a2s: adversarial view vs clean view")
    weight: float = opt(0.0, "ω in ½[(1−ω)·L_nat + (1+ω)·L_adv] (ds only)", min=-1, max=1)
    temperature: float = opt(0.5, "NT-Xent temperature τ", min=1e-3)


@dataclasses.dataclass
class AdCoOptions:
    temperature: float = opt(0.12, "τ: the encoder's InfoNCE temperature (--moco_t)", min=1e-3)
    bank_temperature: float = opt(0.02, "τ_n: temperature of the bank's ascent objective (--mem_t)", min=1e-3)
    bank_size: int = opt(16384, "K: learnable negatives (--cluster)", min=1)
    bank_lr: float = opt(3.0, "the bank's own constant SGD learning rate (--memory_lr)", min=0)
    bank_momentum: float = opt(0.9, "the bank's SGD momentum", min=0, max=1)
    bank_weight_decay: float = opt(1e-4, "the bank's weight decay (--mem_wd)", min=0)
    init_from_keys: bool = opt(True, "fill the bank with the first K keys of training (--ad_init)")
    momentum: float = opt(0.999, "EMA factor m of the key encoder (--moco_m)", min=0, max=1)
    batch_keys: bool = opt(False, "reference quirk: the other images' keys in the batch are extra negatives")
    symmetric: bool = opt(False, "symmetric loss: both views are queries against the other view's key, losses and "
                                 "bank updates averaged (--sym 1)")
    joint_forward: bool = opt(False, "symmetric: both views through each encoder as one interleaved 2N batch (BN "
                                     "statistics over both views; the earlier rsslctl behaviour) instead of one "
                                     "forward per view, as the authors", earlier=True)


@dataclasses.dataclass
class ADIOSOptions:
    num_masks: int = opt(6, "N: masks the occluder splits each image into (authors' default 6)", min=2, max=32)
    sparsity_weight: float = opt(1.0, "α: weight of the occluder's mask sparsity penalty", min=0)
    temperature: float = opt(0.1, "NT-Xent temperature τ (authors' default 0.1)", min=1e-3)
    mask_lr: float = opt(0.1, "occluder learning rate (constant; SGD)", min=0)
    mask_momentum: float = opt(0.9, "occluder SGD momentum", min=0, max=1)
    mask_width: int = opt(32, "channels of the occluder U-Net's first level", min=4, max=512)
    mask_levels: int = opt(0, "U-Net levels (0 = log2(image size) − 1, at least 2)", min=0, max=8)
    mask_norm: Literal["group", "instance", "none"] = opt("group", "normalisation in the occluder's conv blocks")
    update: Literal["alternating", "simultaneous"] = opt("alternating", "encoder then occluder step (authors' code), "
                                                         "or both from one forward pass with a gradient reversal")
    form: Literal["simclr", "byol"] = opt("simclr", "the SSL objective the occluder attacks")
    predictor_hidden: int = opt(512, "BYOL form: hidden width of the predictor MLP", min=1)
    momentum: float = opt(0.99, "BYOL form: EMA rate τ of the target encoder", min=0, max=1)
    joint_forward: bool = opt(False, "SimCLR form: forward both views as one interleaved 2N batch (BN statistics over "
                                     "both views; the earlier rsslctl behaviour) instead of one forward per view, as "
                                     "the authors", earlier=True)


@dataclasses.dataclass
class AdvCLOptions:
    teacher: str = opt("", "run directory of a finished standard SSL run whose features are clustered")
    clusters: tuple[int, ...] = opt((2, 10, 50, 100, 500), "k of each pseudo-label granularity (one head each); "
                                    "capped at the number of training images")
    ce_weight: float = opt(0.2, "weight of the mean pseudo-label cross-entropy", min=0)
    temperature: float = opt(0.5, "SupCon / NT-Xent temperature τ", min=1e-3)
    base_temperature: float = opt(0.07, "SupCon's base temperature: the contrastive term is scaled by τ / base "
                                        "(reference 0.07; set it to τ for the unscaled NT-Xent)", min=1e-3)
    attack_bn: Literal["train", "eval"] = opt("train", "BN mode of the attack forwards: train = batch statistics "
                                                       "(reference), eval = running statistics", earlier="eval")
    radius: float = opt(8.0, "radius of the low-frequency disc removed for the high-frequency view", min=0)
    padding: int = opt(4, "random-crop padding of the original view", min=0)
    kmeans_seed: int = opt(0, "random_state of k-means", min=0)


@dataclasses.dataclass
class DynACLOptions:
    temperature: float = opt(0.5, "NT-Xent temperature τ", min=1e-3)
    period: int = opt(50, "K: epochs between strength/weight steps (--reload_frequency)", min=1)
    anneal_augment: bool = opt(True, "anneal the augmentation strength s(e) (false: keep [augment] strength)")
    swap: Number = opt(2 / 3, "λ of the weight schedule (--swap_param)", min=0, max=1.5)
    weight_form: Literal["air", "official"] = opt(
        "air", "air: ω = λ(1−s(e)) (AIR/RCS); official: ω = min(⌊e/K⌋·K/E·λ, 1) (PKU-ML/DYNACL)")
    momentum_encoder: bool = opt(False, "official DynACL: EMA key encoder on view 2, evaluated instead of the "
                                        "trained encoder")
    momentum: float = opt(0.99, "EMA factor of the key encoder", min=0, max=1)


@dataclasses.dataclass
class AIROptions(DynACLOptions):
    dynamic: bool = opt(True, "DynACL-AIR: anneal augmentation and ω (false: ACL-AIR, ω = 0, fixed strength)")
    lambda1: float = opt(0.5, "λ1, weight of the standard invariant regulariser (SIR)", min=0)
    lambda2: float = opt(0.5, "λ2, weight of the adversarial invariant regulariser (AIR)", min=0)
    kl_impl: Literal["true_kl", "reference"] = opt(
        "true_kl", "true_kl: the paper's KL; reference: the official code's non-KL quantity (parity only)")


@dataclasses.dataclass
class BYORLOptions:
    momentum: float = opt(0.996, "m₀: EMA momentum of the target network at the start", min=0, max=1)
    cosine_momentum: bool = opt(True, "raise the momentum from m₀ to 1 on BYOL's cosine schedule (false: constant)")
    pred_hidden: int = opt(4096, "predictor hidden width (Linear → BN → ReLU → Linear)", min=1)
    clean_weight: float = opt(0.0, "weight of an extra BYOL loss on the clean views (0 = adversarial only)", min=0)
    average_directions: bool = opt(False, "the mean of the two directions' BYOL losses (the earlier rsslctl "
                                          "behaviour) instead of their sum, as BYOL", earlier=True)
    joint_forward: bool = opt(False, "both views through each network as one interleaved 2N batch (BN statistics "
                                     "over both views; the earlier rsslctl behaviour) instead of one forward per view",
                                     earlier=True)


@dataclasses.dataclass
class CaCoOptions:
    temperature: float = opt(0.08, "τ: the encoder's temperature (--moco_t)", min=1e-3)
    bank_temperature: float = opt(0.08, "τ_n: temperature of the bank's update (--mem_t)", min=1e-3)
    bank_size: int = opt(16384, "K: learnable bank vectors (--cluster)", min=1)
    bank_lr: float = opt(3.0, "the bank's own SGD learning rate after its warm-up (--memory_lr)", min=0)
    bank_warmup_epochs: int = opt(10, "linear warm-up of the bank's LR over these epochs (--warmup_epochs)", min=0)
    bank_momentum: float = opt(0.9, "the bank's SGD momentum (--mem_momentum)", min=0, max=1)
    bank_weight_decay: float = opt(0.0, "the bank's weight decay (--mem_wd)", min=0)
    init_from_keys: bool = opt(True, "fill the bank with the first K keys of training (--ad_init)")
    momentum: float = opt(0.99, "m₀: EMA factor of the key encoder at the start (--moco_m)", min=0, max=1)
    cosine_momentum: bool = opt(True, "raise the key encoder's momentum from m₀ to 1 on a cosine over epochs, as the "
                                      "authors' commands (--moco_m_decay 1); false: constant m₀", earlier=False)
    joint_forward: bool = opt(False, "both views through each encoder as one interleaved 2N batch (BN statistics over "
                                     "both views; the earlier rsslctl behaviour) instead of one forward per view, as "
                                     "the authors", earlier=True)


@dataclasses.dataclass
class CLAEOptions:
    temperature: float = opt(0.5, "NT-Xent temperature τ", min=1e-3)
    alpha: float = opt(1.0, "α: weight of the adversarial-positive term", min=0)
    attack_bn: Literal["eval", "train"] = opt("eval", "BN mode of the attack forward; train = reference quirk")


@dataclasses.dataclass
class DeACLOptions:
    teacher: str = opt("", "run directory of the finished stage-1 SSL run whose evaluated encoder is the teacher")
    beta: float = opt(2.0, "β: weight of the adversarial-vs-clean student term (reference --trades_k)", min=0)
    padding: int = opt(4, "weak augmentation: random-crop padding in pixels (then a horizontal flip)", min=0)


@dataclasses.dataclass
class EMPOptions:
    n_views: int = opt(20, "views (patches or crops) per image", min=2)
    tcr_eps: float = opt(0.2, "ε of the coding rate (used directly, EMP-SSL convention)", min=1e-6)
    inv_weight: float = opt(200.0, "λ, weight of the invariance term (--patch_sim)", min=0)
    tcr_weight: float = opt(1.0, "weight of the total coding rate (--tcr)", min=0)
    pre_dim: int = opt(4096, "pre-feature width (the evaluated representation)", min=1)
    hidden_dim: int = opt(4096, "projector hidden width", min=1)
    z_dim: int = opt(1024, "embedding width", min=1)
    blur_p: float = opt(0.1, "Gaussian blur probability (σ in [0.1, 2])", min=0, max=1)
    solarize_p: float = opt(0.1, "solarisation probability", min=0, max=1)
    eval_views: int = opt(16, "bag-of-features views per image at evaluation (0 = whole image)", min=0)


@dataclasses.dataclass
class EMPAdvOptions(EMPOptions, AdvTrainingOptions):
    pass


@dataclasses.dataclass
class HCLOptions:
    temperature: float = opt(0.5, "temperature τ", min=1e-3)
    beta: float = opt(1.0, "β: hardness of the negative re-weighting (0 = debiased contrastive loss)", min=0)
    tau_plus: float = opt(0.1, "τ⁺: class prior, the expected share of same-class 'negatives'", min=0, max=0.99)
    clamp: bool = opt(True, "clamp the negative term below at N·e^{−1/τ} (as the paper and its code)")


@dataclasses.dataclass
class IFMOptions:
    temperature: float = opt(0.5, "NT-Xent temperature τ", min=1e-3)
    epsilon: float = opt(0.1, "ε: budget of the implicit embedding-space perturbation (cosine units)", min=0, max=1)
    alpha: float = opt(1.0, "α: loss = (L + α·L_ifm)/(1 + α) (the reference's --alpha)", min=0)
    ifm_only: bool = opt(False, "train on L_ifm alone (the reference's --method ifm_only)")


@dataclasses.dataclass
class MAEOptions:
    mask_ratio: float = opt(0.75, "fraction r of the patches masked per image", min=0.0, max=0.99)
    norm_pix_loss: bool = opt(True, "target = per-patch normalised pixels (the paper's best setting)")
    sincos_pos_embed: bool = opt(True, "replace the ViT's learned positional embedding by a fixed 2-D sin-cos one "
                                       "(as the paper; needed by AdPE's coordinate mode)")
    decoder_width: int = opt(128, "decoder embedding width (paper: 512)", min=4)
    decoder_depth: int = opt(2, "decoder transformer blocks (paper: 8)", min=1, max=32)
    decoder_heads: int = opt(4, "decoder attention heads (paper: 16)", min=1)
    adversarial_weight: float = opt(0.5, "with an [attack]: a in (1 − a)·L(clean) + a·L(adversarial)", min=0, max=1)
    contrastive_weight: float = opt(0.0, "λ of an NT-Xent term on two views' pooled encoder features (0 = off)",
                                    min=0)
    temperature: float = opt(0.5, "NT-Xent temperature τ of the contrastive term", min=1e-3)
    decay_biases_and_norms: bool = opt(False, "apply weight decay to biases and 1-D tensors (norm weights) too; "
                                              "false exempts them, as the authors' code", earlier=True)
    mae_plus: Literal["auto", "on", "off"] = opt(
        "auto", "MAE+ (the AdPE authors' baseline): the encoder also takes a mask token at every masked position and "
                "the decoder reads its whole output; auto = on with AdPE's joint update", earlier="off")
    adpe: Literal["off", "embedding", "coordinate"] = opt(
        "off", "AdPE: perturb the embeddings (embedding) or the coordinates (coordinate) of the positions")
    adpe_update: Literal["joint", "ascent"] = opt(
        "joint", "joint: δ is a parameter the run's optimizer ascends in the same step as the model descends, on the "
                 "masked positions of MAE+ (the authors'); ascent: sign-gradient ascent each step on the visible "
                 "patches of a plain MAE (our earlier formulation)", earlier="ascent")
    adpe_norm: Literal["none", "l2", "linf"] = opt(
        "none", "joint update: the ball δ is projected onto after every step, per position (the authors' --norm "
                "0/1/2); the ascent update is always L∞")
    adpe_eps: Number = opt(1.0, "radius of AdPE's ball (embedding units, or patches in coordinate mode)", min=0)
    adpe_lr_scale: Number = opt(1.0, "joint update: δ's learning rate as a multiple of the schedule's (the "
                                     "authors' adv_lr / lr)", min=0)
    adpe_weight_decay: Number = opt(0.0, "joint update: δ's weight decay (the authors' adv_wd)", min=0)
    adpe_step_size: Number = opt(0.25, "ascent update: step size", min=0)
    adpe_steps: int = opt(1, "ascent update: sign-gradient steps per training step", min=1, max=100)
    adpe_shared: bool = opt(True, "one perturbation for every position (coordinate: one global shift of the grid; "
                                  "embedding: one adversarial token), as the authors, instead of one per position")
    adpe_persistent: bool = opt(False, "ascent update: carry δ over from step to step (warm start, kept in "
                                       "checkpoints) instead of starting each step from 0")


@dataclasses.dataclass
class MoCHiOptions:
    temperature: float = opt(0.2, "InfoNCE temperature τ (MoCo v2: 0.2)", min=1e-3)
    queue_size: int = opt(16384, "K: queue length (keep it well above the batch size)", min=1)
    momentum: float = opt(0.999, "EMA factor m of the key encoder", min=0, max=1)
    n_hard: int = opt(1024, "N: hardest queue negatives per query that are mixed", min=1)
    s1: int = opt(1024, "s: synthetic negatives mixing two hard negatives", min=0)
    s2: int = opt(512, "s′: synthetic negatives mixing the query with a hard negative", min=0)
    beta_max: float = opt(0.5, "β of the query mixes is drawn from U(0, β_max)", min=0, max=0.5)
    mix_from_epoch: int = opt(1, "first epoch with synthetic negatives (earlier epochs: plain MoCo v2)", min=1)


@dataclasses.dataclass
class MultitaskOptions:
    tasks: dict[str, Any] = opt({"simclr": {"weight": 1.0}, "rotation": {"weight": 1.0}, "jigsaw": {"weight": 1.0}},
                                "one table per task, [method.tasks.NAME]: weight (≥ 0), method (default NAME) and "
                                "that method's options")


@dataclasses.dataclass
class SATOptions:
    num_classes: int = opt(10, "number of classes of the training labels", min=2)


@dataclasses.dataclass
class JigsawOptions:
    grid: int = opt(2, "tiles per side (the image size must be divisible by it)", min=2, max=4)
    permutations: int = opt(24, "number of tile permutations to classify (fixed set, seeded)", min=2)


@dataclasses.dataclass
class RoCLOptions:
    temperature: float = opt(0.5, "NT-Xent temperature τ", min=1e-3)
    lamda: float = opt(256.0, "λ: the regulariser NT-Xent(x̃₁, x₂) is weighted 1/λ (reference --lamda)", min=1e-6)
    one_sided: bool = opt(False, "reference quirk: similarities against a detached copy, gradients through one side "
                                 "(in the loss and the attack objective)")


@dataclasses.dataclass
class SimCLROptions:
    temperature: float = opt(0.5, "NT-Xent temperature τ", min=1e-3)


@dataclasses.dataclass
class SimCLRAdvOptions(AdvTrainingOptions):
    temperature: float = opt(0.07, "NT-Xent temperature τ (CF-AMC-SSL: 0.07)", min=1e-3)
    pre_dim: int = opt(0, "method-owned pre-feature width, the evaluated representation (CF-AMC-SSL: 4096; needs "
                          "encoder.head_layers = 0); 0 = the [encoder] head projects, backbone features are evaluated",
                       min=0)
    hidden_dim: int = opt(4096, "with pre_dim: projector hidden width (Linear+BN+ReLU)", min=1)
    z_dim: int = opt(128, "with pre_dim: embedding width (last Linear, no BN)", min=1)


DECLARED = [
    Declared("method", "acl", "acl",
             "ACL: contrastive PGD on the views (eval mode, pgd BN), NT-Xent on clean and adversarial pairs.",
             ACLOptions,
             citation=("@inproceedings{jiang2020acl, title={Robust Pre-Training by Adversarial Contrastive "
                       "Learning}, author={Jiang, Ziyu and Chen, Tianlong and Chen, Ting and Wang, Zhangyang}, "
                       "booktitle={NeurIPS}, year={2020}}"),
             needs_attack=True),
    Declared("method", "adco", "adco",
             ("AdCo: MoCo-style encoder against a bank of negatives trained by gradient ascent (own LR and "
              "temperature)."), AdCoOptions,
             citation=("@inproceedings{hu2021adco, title={AdCo: Adversarial Contrast for Efficient Learning of "
                       "Unsupervised Representations from Self-Trained Negative Adversaries}, author={Hu, "
                       "Qianjiang and Wang, Xiao and Hu, Wei and Qi, Guo-Jun}, booktitle={CVPR}, year={2021}}")),
    Declared("method", "adios", "adios",
             ("ADIOS: an occluder network learns N masks adversarially against the SSL loss (SimCLR or BYOL "
              "form)."), ADIOSOptions,
             citation=("@inproceedings{shi2022adios, title={Adversarial Masking for Self-Supervised Learning}, "
                       "author={Shi, Yuge and Siddharth, N. and Torr, Philip H. S. and Kosiorek, Adam R.}, "
                       "booktitle={ICML}, year={2022}}")),
    Declared("method", "advcl", "advcl",
             ("AdvCL: adversarial SupCon over augmented, adversarial and high-frequency views + cluster pseudo "
              "labels."), AdvCLOptions,
             citation=("@inproceedings{fan2021advcl, title={When Does Contrastive Learning Preserve "
                       "Adversarial Robustness from Pretraining to Finetuning?}, author={Fan, Lijie and Liu, "
                       "Sijia and Chen, Pin-Yu and Zhang, Gaoyuan and Gan, Chuang}, booktitle={NeurIPS}, "
                       "year={2021}}"),
             needs_attack=True),
    Declared("method", "air", "air",
             "ACL-AIR / DynACL-AIR: DynACL losses plus SIR and AIR with the original image as a third input.",
             AIROptions,
             citation=("@inproceedings{xu2023air, title={Enhancing Adversarial Contrastive Learning via "
                       "Adversarial Invariant Regularization}, author={Xu, Xilie and Zhang, Jingfeng and Liu, "
                       "Feng and Sugiyama, Masashi and Kankanhalli, Mohan}, booktitle={NeurIPS}, year={2023}}"),
             needs_attack=True),
    Declared("method", "byorl", "byorl",
             ("BYORL: BYOL (online + predictor vs EMA target) trained on PGD views that maximise the BYOL "
              "loss."), BYORLOptions,
             citation=("@inproceedings{gowal2021byorl, title={Self-supervised Adversarial Robustness for the "
                       "Low-label, High-data Regime}, author={Gowal, Sven and Huang, Po-Sen and van den Oord, "
                       "Aaron and Mann, Timothy and Kohli, Pushmeet}, booktitle={ICLR}, year={2021}}"),
             needs_attack=True),
    Declared("method", "caco", "caco",
             ("CaCo: learnable positives (cooperative) and negatives (adversarial) in one bank, symmetric "
              "MoCo-style loss."), CaCoOptions,
             citation=("@article{wang2022caco, title={CaCo: Both Positive and Negative Samples are Directly "
                       "Learnable via Cooperative-adversarial Contrastive Learning}, author={Wang, Xiao and "
                       "Huang, Yuhang and Zeng, Dan and Qi, Guo-Jun}, journal={arXiv preprint "
                       "arXiv:2203.14370}, year={2022}}")),
    Declared("method", "clae", "clae",
             ("CLAE: SimCLR plus an adversarial (FGSM/PGD) copy of view 1 as a harder positive, through its "
              "own BN."), CLAEOptions,
             citation=("@inproceedings{ho2020clae, title={Contrastive Learning with Adversarial Examples}, "
                       "author={Ho, Chih-Hui and Vasconcelos, Nuno}, booktitle={NeurIPS}, year={2020}}"),
             needs_attack=True),
    Declared("method", "deacl", "deacl",
             "DeACL: adversarial distillation of a frozen standard-SSL teacher (stage 2 of two).", DeACLOptions,
             citation=("@inproceedings{zhang2022deacl, title={Decoupled Adversarial Contrastive Learning for "
                       "Self-supervised Adversarial Robustness}, author={Zhang, Chaoning and Zhang, Kang and "
                       "Zhang, Chenshuang and Niu, Axi and Feng, Jiu and Yoo, Chang D. and Kweon, In So}, "
                       "booktitle={ECCV}, year={2022}}"),
             needs_attack=True),
    Declared("method", "dynacl", "dynacl",
             "DynACL: dual-stream ACL with annealed augmentation and ω; optional EMA key encoder.",
             DynACLOptions,
             citation=("@inproceedings{luo2023dynacl, title={Rethinking the Effect of Data Augmentation in "
                       "Adversarial Contrastive Learning}, author={Luo, Rundong and Wang, Yifei and Wang, "
                       "Yisen}, booktitle={ICLR}, year={2023}}"),
             needs_attack=True),
    Declared("method", "empssl", "empssl",
             "EMP-SSL: many views per image, total coding rate + invariance to the mean view.", EMPOptions,
             citation=("@article{tong2023empssl, title={EMP-SSL: Towards Self-Supervised Learning in One "
                       "Training Epoch}, author={Tong, Shengbang and Chen, Yubei and Ma, Yi and LeCun, Yann}, "
                       "journal={arXiv:2304.03977}, year={2023}}")),
    Declared("method", "empssl_adv", "empssl",
             ("Robust EMP-SSL: the EMP loss on adversarial views only, PGD-AT or free AT (free + crops = "
              "CF-AMC-SSL)."), EMPAdvOptions,
             citation=("@article{ghofrani2025cfamcssl, title={Rapid Learning of Adversarially Robust "
                       "Representations with Cost-Free Adversarial Multi-Crop Self-Supervised Learning}, "
                       "author={Ghofrani, Ali and Jamshidi, Fatemeh}, journal={arXiv:2501.03507}, year={2025}}"),
             needs_attack=True),
    Declared("method", "hcl", "hcl",
             "HCL: SimCLR with hard-negative re-weighting (β) and the debiased negative term (τ⁺).", HCLOptions,
             citation=("@inproceedings{robinson2021hard, title={Contrastive Learning with Hard Negative "
                       "Samples}, author={Robinson, Joshua and Chuang, Ching-Yao and Sra, Suvrit and Jegelka, "
                       "Stefanie}, booktitle={ICLR}, year={2021}}")),
    Declared("method", "ifm", "ifm",
             "IFM: SimCLR with implicit feature modification (closed-form ε-perturbation of the logits).",
             IFMOptions,
             citation=("@inproceedings{robinson2021shortcuts, title={Can contrastive learning avoid shortcut "
                       "solutions?}, author={Robinson, Joshua and Sun, Li and Yu, Ke and Batmanghelich, Kayhan "
                       "and Jegelka, Stefanie and Sra, Suvrit}, booktitle={NeurIPS}, year={2021}}")),
    Declared("method", "mae", "mae",
             ("MAE on a timm ViT; optional pixel-space PGD on the reconstruction (adversarial MIM), "
              "contrastive term, AdPE."), MAEOptions,
             citation=("@inproceedings{he2022mae, title={Masked Autoencoders Are Scalable Vision Learners}, "
                       "author={He, Kaiming and Chen, Xinlei and Xie, Saining and Li, Yanghao and Doll{\\'a}r, "
                       "Piotr and Girshick, Ross}, booktitle={CVPR}, year={2022}}")),
    Declared("method", "mochi", "mochi",
             ("MoCHi: MoCo v2 with hard negatives synthesised by mixing the hardest queue entries (and the "
              "query)."), MoCHiOptions,
             citation=("@inproceedings{kalantidis2020mochi, title={Hard Negative Mixing for Contrastive "
                       "Learning}, author={Kalantidis, Yannis and Sariyildiz, Mert Bulent and Pion, Noe and "
                       "Weinzaepfel, Philippe and Larlus, Diane}, booktitle={NeurIPS}, year={2020}}")),
    Declared("method", "multitask", "multitask",
             ("Multi-task pretraining: Σ_i w_i · L_i over registered methods sharing one encoder, each with "
              "its own heads."), MultitaskOptions,
             citation=("@misc{jaiswal_fan_multitask, title={Multi-task Self-supervised Transfer Learning for "
                       "Adversarial Robustness}, author={Jaiswal and Fan}}")),
    Declared("method", "sat", "pretext",
             "Supervised adversarial training (Madry et al.): PGD-AT with the true labels.", SATOptions,
             citation=("@inproceedings{madry2018pgd, title={Towards Deep Learning Models Resistant to "
                       "Adversarial Attacks}, author={Madry, Aleksander and Makelov, Aleksandar and Schmidt, "
                       "Ludwig and Tsipras, Dimitris and Vladu, Adrian}, booktitle={ICLR}, year={2018}}"),
             needs_attack=True),
    Declared("method", "rotation", "pretext",
             ("Rotation prediction (Gidaris et al., 2018): every image in all four rotations, 4-way "
              "classification."),
             citation=("@inproceedings{gidaris2018rotation, title={Unsupervised Representation Learning by "
                       "Predicting Image Rotations}, author={Gidaris, Spyros and Singh, Praveer and Komodakis, "
                       "Nikos}, booktitle={ICLR}, year={2018}}")),
    Declared("method", "jigsaw", "pretext",
             ("Jigsaw (Noroozi & Favaro, 2016): shuffle a grid×grid tiling by one of a fixed set of "
              "permutations,"), JigsawOptions,
             citation=("@inproceedings{noroozi2016jigsaw, title={Unsupervised Learning of Visual "
                       "Representations by Solving Jigsaw Puzzles}, author={Noroozi, Mehdi and Favaro, Paolo}, "
                       "booktitle={ECCV}, year={2016}}")),
    Declared("method", "rocl", "rocl",
             ("RoCL: instance-wise PGD on view 1 against view 2; original, other view and adversarial view are "
              "positives."), RoCLOptions,
             citation=("@inproceedings{kim2020rocl, title={Adversarial Self-Supervised Contrastive Learning}, "
                       "author={Kim, Minseon and Tack, Jihoon and Hwang, Sung Ju}, booktitle={NeurIPS}, "
                       "year={2020}}"),
             needs_attack=True),
    Declared("method", "simclr", "simclr",
             "SimCLR: NT-Xent on two augmented views (standard, non-robust contrastive learning).",
             SimCLROptions,
             citation=("@inproceedings{chen2020simclr, title={A Simple Framework for Contrastive Learning of "
                       "Visual Representations}, author={Chen, Ting and Kornblith, Simon and Norouzi, Mohammad "
                       "and Hinton, Geoffrey}, booktitle={ICML}, year={2020}}")),
    Declared("method", "simclr_adv", "simclr_adv",
             "SimCLR with PGD-AT (or free AT) on the second view.", SimCLRAdvOptions,
             citation=("@article{ghofrani2025cfamcssl, title={Rapid Learning of Adversarially Robust "
                       "Representations with Cost-Free Adversarial Multi-Crop Self-Supervised Learning}, "
                       "author={Ghofrani, Ali and Jamshidi, Fatemeh}, journal={arXiv:2501.03507}, year={2025}}"),
             needs_attack=True),
]
#: name → BibTeX; the implementing classes read their ``citation`` from here
CITATION = {d.name: d.citation for d in DECLARED}


@hookimpl
def rsslctl_declarations() -> list[Declared]:
    return DECLARED

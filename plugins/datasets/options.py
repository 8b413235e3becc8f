"""Every built-in dataset's options and its lazy declaration, torch-free: listing, citing and validating a
recipe read them without importing the modules that implement the datasets (imported when a run needs them)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from rsslctl import MAX_IMAGE_SIZE, Declared, hookimpl, opt


@dataclasses.dataclass
class Cifar100Options:
    labels: Literal["fine", "coarse"] = opt("fine", "'fine' (100 classes) or 'coarse' (20 superclasses)")


@dataclasses.dataclass
class ImageFolderOptions:
    path: str = opt("", "folder under data.root holding one sub-folder per split")
    image_size: int = opt(32, "images are resized to this square size", min=8, max=MAX_IMAGE_SIZE)
    follow_symlinks: bool = opt(False, "read symlinked files and class folders that point outside the dataset folder")


DECLARED = [
    Declared("dataset", "cifar10", "cifar",
             ("CIFAR-10: 50,000 train / 10,000 test 32x32 colour images in 10 classes (python or binary "
              "release)."),
             citation=("@techreport{krizhevsky2009cifar, title={Learning Multiple Layers of Features from Tiny "
                       "Images}, author={Krizhevsky, Alex}, institution={University of Toronto}, year={2009}}")),
    Declared("dataset", "cifar100", "cifar",
             ("CIFAR-100: 50,000 train / 10,000 test 32x32 colour images in 100 classes (python or binary "
              "release)."), Cifar100Options,
             citation=("@techreport{krizhevsky2009cifar, title={Learning Multiple Layers of Features from Tiny "
                       "Images}, author={Krizhevsky, Alex}, institution={University of Toronto}, year={2009}}")),
    Declared("dataset", "digits", "digits",
             "Handwritten digits bundled with scikit-learn: 1,797 images, 10 classes, as 32x32 RGB.",
             citation=("@misc{alpaydin1998digits, title={Optical Recognition of Handwritten Digits}, "
                       "author={Alpaydin, E. and Kaynak, C.}, howpublished={UCI Machine Learning Repository}, "
                       "year={1998}}")),
    Declared("dataset", "image_folder", "image_folder",
             "Images in one sub-folder per class (ImageFolder layout), resized to a square size, as RGB.",
             ImageFolderOptions),
    Declared("dataset", "imagenet32", "imagenet32",
             "ImageNet at 32x32: 1,281,167 train / 50,000 val colour images in 1,000 classes.",
             citation=("@article{chrabaszcz2017imagenet32, title={A Downsampled Variant of ImageNet as an "
                       "Alternative to the CIFAR datasets}, author={Chrabaszcz, Patryk and Loshchilov, Ilya "
                       "and Hutter, Frank}, journal={arXiv:1707.08819}, year={2017}}")),
    Declared("dataset", "stl10", "stl10",
             "STL-10: 96x96 colour images, 5,000 train / 8,000 test in 10 classes and 100,000 unlabeled.",
             citation=("@inproceedings{coates2011stl10, title={An Analysis of Single-Layer Networks in "
                       "Unsupervised Feature Learning}, author={Coates, Adam and Ng, Andrew and Lee, Honglak}, "
                       "booktitle={AISTATS}, year={2011}}")),
    Declared("dataset", "svhn", "svhn",
             "SVHN: 32x32 colour house-number digits, 73,257 train / 26,032 test / 531,131 extra, 10 classes.",
             citation=("@inproceedings{netzer2011svhn, title={Reading Digits in Natural Images with "
                       "Unsupervised Feature Learning}, author={Netzer, Yuval and Wang, Tao and Coates, Adam "
                       "and Bissacco, Alessandro and Wu, Bo and Ng, Andrew Y.}, booktitle={NIPS Workshop on "
                       "Deep Learning and Unsupervised Feature Learning}, year={2011}}")),
]
#: name → BibTeX; the implementing classes read their ``citation`` from here
CITATION = {d.name: d.citation for d in DECLARED}


@hookimpl
def rsslctl_declarations() -> list[Declared]:
    return DECLARED

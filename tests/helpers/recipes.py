"""Short transcriptions of what the authors' training code does around the modules.

Each is our own restatement of one piece of behaviour, read in the released
code (never copied from it), for the recipe tests to compare the package
against:

- KaiyangZhou/Dassl.pytorch: ``dassl/config/defaults.py`` (the defaults the
  YAML leaves alone), ``dassl/data/transforms/transforms.py``
  (``_build_transform_train``), ``dassl/data/data_manager.py``
  (``build_data_loader``: ``drop_last=is_train and len(data) >= batch_size``),
  ``dassl/optim/optimizer.py`` and ``lr_scheduler.py`` (``ConstantWarmupScheduler``
  around ``CosineAnnealingLR``, stepped once per epoch by the trainer);
- khufia/RAda: ``eft/configs/trainers/RAda/lr_1e-3_layers_4_epochs_5_base2new.yaml``
  and ``eft/trainers/rada.py`` (``CustomCLIP``'s prompts);
- dqmis/clip-mma: ``fomo/utils/data/utils.py`` (``subsample_classes``,
  ``_get_train_val_idx``), ``fomo/pipelines/train.py`` (``set_seed(42)`` before it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision import transforms as T

# The RAda base-to-new YAML, with Dassl's defaults for what it does not set. The launch
# scripts (eft/scripts/rada/train.sh) override LR, BATCH_SIZE and MAX_EPOCH from their
# command line; the YAML's own values of those three are listed for completeness.
RADA_YAML = {
    "INPUT.SIZE": (224, 224),
    "INPUT.INTERPOLATION": "bicubic",
    "INPUT.PIXEL_MEAN": (0.48145466, 0.4578275, 0.40821073),
    "INPUT.PIXEL_STD": (0.26862954, 0.26130258, 0.27577711),
    "INPUT.TRANSFORMS": ("random_resized_crop", "random_flip", "normalize"),
    "INPUT.RRCROP_SCALE": (0.08, 1.0),  # Dassl's default
    "OPTIM.NAME": "adam",
    "OPTIM.WEIGHT_DECAY": 5e-4,
    "OPTIM.ADAM_BETA1": 0.9,  # Dassl's default
    "OPTIM.ADAM_BETA2": 0.999,  # Dassl's default
    "OPTIM.LR_SCHEDULER": "cosine",
    "OPTIM.WARMUP_EPOCH": 1,
    "OPTIM.WARMUP_TYPE": "constant",
    "OPTIM.WARMUP_CONS_LR": 1e-5,
    "OPTIM.WARMUP_RECOUNT": True,  # Dassl's default
    "TEST.FINAL_MODEL": "last_step",  # Dassl's default: the last epoch's weights
    "DATALOADER.TRAIN_X.BATCH_SIZE": 32,  # overridden by the launch scripts
    "OPTIM.MAX_EPOCH": 5,  # overridden by the launch scripts
    "OPTIM.LR": 5e-5,  # overridden by the launch scripts
}
RADA_CTX_INIT = "a photo of a"  # TRAINER.RADA.CTX_INIT
# CoOp's zero-shot prompts (trainers/zsclip.py, CUSTOM_TEMPLATES), under CoOp's dataset class names
COOP_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
}

_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


def dassl_train_transform(yaml: dict = RADA_YAML, size: tuple[int, int] | None = None) -> T.Compose:
    """Dassl's training transform for the YAML's ``random_resized_crop``, ``random_flip``, ``normalize``.

    With a random resized crop Dassl adds no Resize; then the flip, ``ToTensor``
    and ``Normalize(PIXEL_MEAN, PIXEL_STD)``. ``size`` replaces ``INPUT.SIZE``.
    """
    assert tuple(yaml["INPUT.TRANSFORMS"]) == ("random_resized_crop", "random_flip", "normalize")
    mode = _INTERPOLATION[yaml["INPUT.INTERPOLATION"]]
    return T.Compose([
        T.RandomResizedCrop(size or yaml["INPUT.SIZE"], scale=yaml["INPUT.RRCROP_SCALE"], interpolation=mode),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=yaml["INPUT.PIXEL_MEAN"], std=yaml["INPUT.PIXEL_STD"]),
    ])


def dassl_batches_per_epoch(images: int, batch_size: int) -> int:
    """Steps of one epoch: Dassl's training loader, ``drop_last=is_train and len(data) >= batch_size``."""
    loader = torch.utils.data.DataLoader(range(images), batch_size=batch_size, drop_last=images >= batch_size)
    return len(loader)


class _ConstantWarmup(torch.optim.lr_scheduler.LRScheduler):
    """Dassl's ``ConstantWarmupScheduler``: ``cons_lr`` while ``last_epoch < warmup``, then the successor's rates;
    once past the warm-up, ``step`` steps the successor instead of itself."""

    def __init__(self, optimizer, successor, warmup: int, cons_lr: float):
        self.successor, self.warmup, self.cons_lr = successor, warmup, cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self):
        if self.last_epoch >= self.warmup:
            self.successor.step()
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step()


def dassl_epoch_lrs(lr: float, epochs: int, yaml: dict = RADA_YAML) -> list[float]:
    """The learning rate of each epoch under Dassl's cosine schedule with the YAML's constant warm-up.

    Dassl builds ``CosineAnnealingLR(optimizer, T_max=MAX_EPOCH)`` and wraps it in
    the constant warm-up (``WARMUP_RECOUNT``: the cosine's count is left at 0); the
    RAda trainer calls ``update_lr()`` once per epoch, after its last batch.
    """
    assert yaml["OPTIM.WARMUP_TYPE"] == "constant" and yaml["OPTIM.WARMUP_RECOUNT"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(epochs))
    scheduler = _ConstantWarmup(optimizer, cosine, yaml["OPTIM.WARMUP_EPOCH"], yaml["OPTIM.WARMUP_CONS_LR"])
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def released_rada_prompt(classname: str) -> str:
    """``CustomCLIP``'s prompt: ``CTX_INIT + " " + name + "."``, underscores read as spaces."""
    return RADA_CTX_INIT + " " + classname.replace("_", " ") + "."


def mma_base_indices(labels: Sequence[int]) -> tuple[list[int], dict[int, int]]:
    """clip-mma's ``subsample_classes(dataset, "base")``: the first ``len // 2`` sorted labels.

    Returns the kept items' indices, in data order, and the label remapping.
    """
    unique = sorted(set(labels))
    base = unique[: len(unique) // 2]
    mapping = {old: new for new, old in enumerate(base)}
    return [i for i, y in enumerate(labels) if y in base], mapping


def mma_train_val_indices(labels: Sequence[int], shots: int, seed: int = 42) -> tuple[list[int], list[int]]:
    """clip-mma's ``_get_train_val_idx`` after ``set_seed(seed)``: scikit-learn itself, numpy's global state seeded.

    ``train_test_split(range(N), stratify=labels, train_size=shots·C, test_size=shots·C)``
    with no ``random_state``, i.e. numpy's global generator, which ``set_seed`` seeded
    (numpy's global state is restored afterwards).
    """
    from sklearn.model_selection import train_test_split

    classes = len(set(labels))
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        train, val = train_test_split(range(len(labels)), stratify=list(labels), train_size=shots * classes,
                                      test_size=shots * classes)
    finally:
        np.random.set_state(state)
    return list(train), list(val)

"""Encode every image once with the frozen backbone, and keep the features.

Training RAda or MMA on a frozen CLIP only ever needs the encoders' outputs;
:func:`extract_image_features` computes them once (batched, without
gradients, bf16 autocast on CUDA, a progress bar), optionally for several
augmented views per image, and keeps them in a safetensors file whose metadata
holds a fingerprint of everything they depend on: model class, weights,
preprocessing, data, views and augmentation. A cache whose fingerprint differs
is rebuilt, with a warning that says what changed; it is never reused.

Under ``torchrun`` each rank encodes a share of the batches, the features are
gathered in the original order on every rank, and only rank 0 writes the file.

>>> features = extract_image_features(model, splits, splits.train, preprocess, cache_path=Path("train.safetensors"))
>>> logits = model.logits_from_features(features.image[:32])   # as model(images) gives them
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .._version import __version__
from ..backends import model_device
from ..io import save_safetensors
from .data import Item, Splits
from .distributed import barrier, comm_device, rank_world

__all__ = [
    "FORMAT",
    "DATA_HASHES",
    "FORMAT_VERSION",
    "Features",
    "augment_view",
    "data_digest",
    "default_augment",
    "encode_class_texts",
    "extract_image_features",
    "fingerprint_parts",
    "load_features",
    "save_features",
    "tensors_checksum",
    "weights_digest",
]

logger = logging.getLogger(__name__)

FORMAT = "rada_mma.features"
FORMAT_VERSION = "2"  # bump when what is stored, or how features are computed, changes (2: checksums)
IMAGE_TENSORS = ("image", "labels")
TEXT_TENSORS = ("text",)


@dataclass
class Features:
    """Image features of a list of items, as the frozen encoder gives them.

    Args:
        image: raw fp32 embeddings ``(N, D)``, or ``(N, V, D)`` for ``V`` augmented views per image.
        labels: ``(N,)`` int64 labels of the items.
        fingerprint: sha256 of what the features depend on (see :func:`fingerprint_parts`).
    """

    image: Tensor
    labels: Tensor
    fingerprint: str

    @property
    def views(self) -> int:
        """``V`` for ``(N, V, D)`` features, 0 for ``(N, D)``."""
        return self.image.shape[1] if self.image.dim() == 3 else 0

    def __len__(self) -> int:
        return self.labels.shape[0]


# -- fingerprints ------------------------------------------------------------------------------


def weights_digest(module: nn.Module) -> str:
    """sha256 over the name, dtype, shape and every byte of each tensor of ``module.state_dict()``.

    All bytes are hashed, not a sample: about a second per GB of weights, done
    once per extraction. Parameters outside ``state_dict`` (none in CLIP models) are not covered.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)};".encode())
        flat = tensor.reshape(-1)
        step = 1 << 24  # elements per copy to the CPU: bounded memory for GPU tensors
        for start in range(0, flat.numel(), step):
            chunk = flat[start : start + step].to("cpu").contiguous()
            digest.update(chunk.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _describe(transform: Any) -> str:
    """``repr`` without memory addresses, so that the same pipeline describes itself the same in every process.

    Functions and lambdas are known by name only: give ``fingerprint_extra`` to tell two apart.
    """
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


DATA_HASHES = ("content", "stat")  # how image files enter the fingerprint


def file_digest(path: Path, digest: Any, *, chunk: int = 1 << 20) -> None:
    """Feed ``path``'s bytes into ``digest``, streamed (memory bounded by ``chunk``)."""
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(chunk):
            digest.update(block)


def data_digest(splits: Splits, items: Sequence[Item], data_hash: str = "content") -> str:
    """sha256 of the item list: sources, labels and, for files, every byte (``"content"``) or size and
    modification time (``"stat"``: cheaper on huge datasets, but blind to an edit that keeps both)."""
    if data_hash not in DATA_HASHES:
        raise ValueError(f"data_hash must be one of {', '.join(map(repr, DATA_HASHES))}, got {data_hash!r}")
    digest = hashlib.sha256(f"{splits.name}|{len(items)};".encode())
    if splits.dataset is not None:
        digest.update(f"dataset={type(splits.dataset).__name__}|{len(splits.dataset)};".encode())
    for item in items:
        if isinstance(item.source, str):
            path = splits.path(item)
            try:
                stat = path.stat()
                digest.update(f"{item.source}|{item.label}|{stat.st_size}".encode())
                if data_hash == "content":
                    digest.update(b"=")
                    file_digest(path, digest)
                    digest.update(b";")
                else:
                    digest.update(f"|{stat.st_mtime_ns};".encode())
            except FileNotFoundError:
                raise FileNotFoundError(f"image {path} is missing; load the data again from its current folder") from None
        else:
            digest.update(f"#{item.source}|{item.label};".encode())
    return f"{data_hash}:{digest.hexdigest()}"


def fingerprint_parts(
    model: nn.Module,
    splits: Splits,
    items: Sequence[Item],
    transform: Any,
    *,
    views: int = 0,
    augment: Any = None,
    seed: int = 0,
    autocast: bool = False,
    extra: Mapping[str, Any] | None = None,
    data_hash: str = "content",
) -> dict[str, str]:
    """What image features depend on, one entry per kind, each a short string or a digest.

    Covered: the format version; the model's class and backend; every byte of
    the base model's weights and buffers; the preprocessing's ``repr``; the
    dataset name, each item's source and label and each image file's size and
    bytes (``data_hash="content"``, the default) or size and modification time
    (``"stat"``); a torch Dataset's samples are known only by index (put a
    version of it in ``extra``); the number of views, the augmentation's
    ``repr`` and seed; whether bf16 autocast is on; and ``extra``. Not covered:
    the device and library versions, which change features by rounding only.
    """
    base = getattr(model, "base", model)
    backend = getattr(getattr(model, "backend", None), "name", "none")
    return {
        "format": f"{FORMAT}/{FORMAT_VERSION}",
        "model": f"{type(base).__module__}.{type(base).__qualname__}/backend={backend}",
        "weights": weights_digest(base),
        "preprocessing": _sha(_describe(transform)),
        "data": data_digest(splits, items, data_hash),
        # spelled out, so that a cache file says which views it holds: count, seed, every transform's parameters
        "views": f"{views}" if views == 0 else f"{views}/seed={seed}/{' '.join(_describe(augment).split())}",
        "precision": "bf16-autocast" if autocast else "fp32",
        "extra": _sha(extra or {}),
    }


def _fingerprint(parts: Mapping[str, str]) -> str:
    return _sha(dict(parts))


# -- augmentation ------------------------------------------------------------------------------


def default_augment(
    transform: Any, *, scale: tuple[float, float] = (0.08, 1.0), interpolation: str | None = "bicubic"
) -> Any:
    """The RAda trainers' training augmentation (Dassl's) for a model's preprocessing.

    Dassl builds ``RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=bicubic)``,
    ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(CLIP's mean, std)`` from the
    RAda YAML (``random_resized_crop``, ``random_flip``, ``normalize``). Here the
    preprocessing's ``Resize`` and ``CenterCrop`` become that crop (at the
    preprocessing's crop size) and flip; its other steps (to tensor, normalise) follow.

    Args:
        transform: a torchvision ``Compose`` such as open_clip's ``preprocess``.
        scale: the crop's area range.
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``; ``None`` keeps the
            preprocessing's own.

    Example:
        >>> augment = default_augment(preprocess)   # RandomResizedCrop(224, (0.08, 1.0), bicubic), flip, ...
    """
    from torchvision import transforms as T

    if not isinstance(transform, T.Compose):
        raise ValueError(
            f"cannot derive an augmentation from a {type(transform).__name__}; pass augment=<a transform from a PIL "
            "image to a tensor> (e.g. RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize)"
        )
    size, own, rest = None, T.InterpolationMode.BICUBIC, []
    for step in transform.transforms:
        if isinstance(step, T.Resize):
            own = step.interpolation
            size = size or step.size
        elif isinstance(step, T.CenterCrop):
            size = step.size
        else:
            rest.append(step)
    if size is None:
        raise ValueError(
            "the preprocessing has no Resize or CenterCrop to take the image size from; pass augment= explicitly"
        )
    mode = own if interpolation is None else T.InterpolationMode(interpolation)
    return T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=mode), T.RandomHorizontalFlip(), *rest])


def augment_view(augment: Callable, image: Any, *, seed: int, item: Item, view: int) -> Tensor:
    """View ``view`` of ``item``: ``augment(image)`` under the seed the feature cache uses for it.

    The cache encodes exactly these pixels, whatever the rank, worker or batch
    size; so a loop that augments on the fly with ``view = epoch`` sees what a
    cache of ``views="per_epoch"`` holds, and trains to the same weights.

    Args:
        augment: PIL image -> tensor, e.g. :func:`default_augment`'s.
        image: the item's PIL image (``splits.load_image(item)``).
        seed: the run's seed (the cache's ``seed``).
        item: the item (its source names it in the seed).
        view: the view index (the epoch, for per-epoch views).
    """
    with _seeded(_view_seed(seed, item, view)):
        return _as_tensor(augment(image))


def _view_seed(seed: int, item: Item, view: int) -> int:
    """A seed per (item, view): the same on every rank, in every worker, in every run."""
    key = hashlib.sha256(f"{seed}|{item.source!r}|{view}".encode()).digest()
    return int.from_bytes(key[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator and Python's ``random`` for one transform, restoring both after."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        # the CPU generator alone: torch.manual_seed would also reseed (and leave changed) every accelerator's,
        # and costs a millisecond a call, 40% of the time of encoding an augmented view on a CPU
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


class _Views(Dataset):
    """Index ``j`` is image ``j // V``, view ``j % V`` (``V = 1`` and no augmentation when views is 0)."""

    def __init__(self, splits: Splits, items: Sequence[Item], transform: Callable, augment: Callable | None, views: int, seed: int):
        self.splits, self.items, self.transform = splits, list(items), transform
        self.augment, self.views, self.seed = augment, views, seed
        self._last: tuple[int, Any] | None = None  # (item index, its decoded image)

    def __len__(self) -> int:
        return len(self.items) * max(self.views, 1)

    def __getitem__(self, index: int) -> Tensor:
        if self.views == 0:
            return _as_tensor(self.transform(self.splits.load_image(self.items[index])))
        item, view = divmod(index, self.views)
        if self._last is None or self._last[0] != item:  # an image's views come one after another: decode it once
            self._last = (item, self.splits.load_image(self.items[item]))
        return augment_view(self.augment, self._last[1], seed=self.seed, item=self.items[item], view=view)


def _as_tensor(image: Any) -> Tensor:
    """One ``(C, H, W)`` tensor from a transform's output (a Hugging Face processor gives a batch of one)."""
    if isinstance(image, Mapping) and "pixel_values" in image:
        image = image["pixel_values"]
        image = image[0] if len(image) == 1 else image
    if not isinstance(image, Tensor):
        try:
            image = torch.as_tensor(image)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"the transform gave a {type(image).__name__}; it must turn a PIL image into a (C, H, W) tensor"
            ) from err
    return image


# -- extraction --------------------------------------------------------------------------------


def _frozen_model(model: nn.Module) -> None:
    if not callable(getattr(model, "encode_image", None)) or not hasattr(model, "base"):
        raise TypeError(
            f"the feature cache takes an AdaptedCLIP (rada_mma.wrap(clip)), got {type(model).__name__}; wrap the model first"
        )
    if not getattr(model, "freeze_backbone", True):
        raise ValueError(
            "the model trains its encoders (freeze_backbone=False), so its features change every step and cannot be "
            "cached; encode images on the fly, or wrap with freeze_backbone=True"
        )


def extract_image_features(
    model: nn.Module,
    splits: Splits,
    items: Sequence[Item],
    transform: Callable,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    views: int = 0,
    augment: Callable | None = None,
    device: str | torch.device | None = None,
    cache_path: str | os.PathLike | None = None,
    progress: bool = True,
    fingerprint_extra: Mapping[str, Any] | None = None,
    seed: int = 0,
    autocast: bool = True,
    data_hash: str = "content",
) -> Features:
    """Raw image embeddings of ``items`` from the frozen image encoder, cached on disk.

    Batches are formed in item order, so with ``views=0`` and the same batch
    size a training loop that reads the cache in that order sees bit for bit
    what ``model(images)`` computes. Under ``torch.distributed`` rank ``r``
    encodes batches ``r, r + W, ...`` (each batch as in a single-process run,
    so the result is identical to one), the features are gathered in item order
    on every rank, and only rank 0 writes the file.

    Args:
        model: an :class:`~rada_mma.AdaptedCLIP` with a frozen backbone.
        splits: the data the items come from.
        items: e.g. ``splits.train``.
        transform: the model's preprocessing (PIL image -> tensor).
        batch_size: images per forward pass (views count as images).
        num_workers: ``DataLoader`` workers for decoding images.
        views: ``V > 0`` encodes every image ``V`` times through ``augment``, giving ``(N, V, D)``;
            every view is augmented (the un-augmented features are the ``views=0`` extraction).
        augment: PIL image -> tensor augmentation; default :func:`default_augment` of ``transform``.
            It is seeded per (item, view) from ``seed``: reproducible, and the same whatever the
            rank, worker or batch size.
        device: where to encode: the model's device (the default); another is an error.
        cache_path: a ``.safetensors`` file; loaded when its fingerprint matches, rebuilt (with a
            warning naming what changed) when it does not.
        progress: show a progress bar (rank 0 only).
        fingerprint_extra: more things the features depend on (e.g. a dataset version), JSON-able.
        seed: seed of the augmentations.
        autocast: encode under bf16 autocast on CUDA (ignored on the CPU).
        data_hash: image files in the fingerprint: every byte (``"content"``; ~1 % of the extraction time),
            or size and modification time (``"stat"``, for huge datasets never edited in place).

    Returns:
        :class:`Features` on the CPU, fp32.
    """
    items = list(items)
    device = _check_extraction(model, items, views, batch_size, device)
    if views > 0 and augment is None:
        augment = default_augment(transform)
    amp = autocast and device.type == "cuda"
    rank, world = rank_world()
    parts = fingerprint_parts(model, splits, items, transform, views=views, augment=augment, seed=seed, autocast=amp,
                              extra=fingerprint_extra, data_hash=data_hash)
    fingerprint = _fingerprint(parts)
    if world > 1:
        _same_on_all_ranks(fingerprint, parts)
    labels = torch.tensor([item.label for item in items], dtype=torch.int64)
    path = Path(cache_path) if cache_path is not None else None
    if path is not None:
        cached = _load_cached(path, fingerprint, parts, labels, views, device, rank, world)
        if cached is not None:
            return cached
    dataset = _Views(splits, items, transform, augment, views, seed)
    flat = _encode(model, dataset, batch_size, num_workers, device, amp, progress, rank, world)  # (N·V, D)
    image = flat.reshape(len(items), views, -1) if views else flat
    features = Features(image=image, labels=labels, fingerprint=fingerprint)
    if path is not None:
        if rank == 0:
            save_features(features, path, parts=parts)
            logger.info("cached %s image features in %s", tuple(image.shape), path)
        barrier()
    return features


def _check_extraction(model: nn.Module, items: list[Item], views: int, batch_size: int, device: Any) -> torch.device:
    """Refuse what extraction cannot do; the device to encode on."""
    _frozen_model(model)
    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise ValueError(f"views must be an integer >= 0, got {views!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not items:
        raise ValueError("no items to encode; pass e.g. splits.train")
    device = torch.device(device) if device is not None else model_device(model.base)
    if not _same_device(device, model_device(model.base)):
        raise ValueError(
            f"the model is on {model_device(model.base)} but device={device}; move it first (model.to({str(device)!r})) "
            "or leave device unset"
        )
    return device


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device when 0 is the current one."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def _same_on_all_ranks(fingerprint: str, parts: Mapping[str, str]) -> None:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (fingerprint, dict(parts)))
    differ = sorted({key for _, other in gathered for key in parts if other[key] != parts[key]})
    if differ:
        raise RuntimeError(
            f"the ranks extract features of different things ({', '.join(differ)} differ); give every rank the same "
            "model, weights, preprocessing and items"
        )


def _encode(
    model: nn.Module,
    dataset: _Views,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    amp: bool,
    progress: bool,
    rank: int,
    world: int,
) -> Tensor:
    """Encode ``dataset`` in batches of ``batch_size``; rank ``r`` takes batches ``r, r + W, ...``."""
    total = len(dataset)
    batches = [range(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]
    mine = [index for batch in batches[rank::world] for index in batch]
    loader = DataLoader(
        torch.utils.data.Subset(dataset, mine),
        batch_size=batch_size,  # only the globally last batch is short, and it is its rank's last
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    dim = model.adapter.dim
    chunks = [torch.empty(0, dim)]
    was_training = model.base.training
    model.base.eval()
    try:
        bar = tqdm(loader, desc="encoding images", unit="batch", disable=not progress or rank != 0, dynamic_ncols=True)
        for images in bar:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                chunks.append(model.encode_image(images.to(device, non_blocking=True)).float().cpu())
    finally:
        model.base.train(was_training)
    local = torch.cat(chunks)  # (rows of this rank, D)
    if world == 1:
        return local
    sizes = [sum(len(b) for b in batches[r::world]) for r in range(world)]
    comm = comm_device(device)
    padded = torch.zeros(max(sizes), dim, device=comm)
    padded[: local.shape[0]] = local.to(comm)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    out = torch.empty(total, dim)
    for r in range(world):
        row = 0
        for batch in batches[r::world]:
            out[batch.start : batch.stop] = gathered[r][row : row + len(batch)].cpu()
            row += len(batch)
    return out


def _load_cached(
    path: Path,
    fingerprint: str,
    parts: Mapping[str, str],
    labels: Tensor,
    views: int,
    device: torch.device,
    rank: int,
    world: int,
) -> Features | None:
    """The cached features if ``path`` holds them for exactly this fingerprint (rank 0 reads, others receive)."""
    if world == 1:
        return _read_if_fresh(path, fingerprint, parts, labels, views)
    features, error = None, None
    if rank == 0:
        try:
            features = _read_if_fresh(path, fingerprint, parts, labels, views)
        except (OSError, ValueError) as err:  # raised on every rank below, so that none waits forever
            error = err
    shape = [tuple(features.image.shape) if features is not None else None, None if error is None else str(error)]
    dist.broadcast_object_list(shape, src=0)
    if error is not None:
        raise error
    if shape[1] is not None:
        raise ValueError(f"rank 0 could not use the feature cache: {shape[1]}")
    if shape[0] is None:
        return None
    comm = comm_device(device)
    image = features.image.to(comm) if features is not None else torch.empty(shape[0], device=comm)
    dist.broadcast(image, src=0)
    return Features(image=image.cpu(), labels=labels, fingerprint=fingerprint)


def _is_fresh(path: Path, fingerprint: str, parts: Mapping[str, str], kind: str) -> bool:
    """Whether ``path`` holds ``kind`` features of exactly this fingerprint; stale or unreadable files are
    reported (and will be rebuilt), a file that is not a rada_mma cache of that kind is never overwritten."""
    what = "feature cache" if kind == "image" else f"{kind} feature cache"
    if not path.exists():
        return False
    try:
        meta = _metadata(path)
    except ValueError as err:
        logger.warning("%s %s is unreadable (%s); rebuilding it", what, path, err)
        return False
    if meta.get("format") != FORMAT or meta.get("kind") != kind:
        raise ValueError(
            f"{path} is not a rada_mma {what} (metadata format={meta.get('format')!r}, kind={meta.get('kind')!r}); "
            "it is not overwritten: choose another cache_path, or delete the file"
        )
    if meta.get("fingerprint") == fingerprint:
        return True
    try:
        old = json.loads(meta.get("parts", "{}"))
    except json.JSONDecodeError:
        old = {}
    changed = [key for key in parts if old.get(key) != parts[key]] or ["fingerprint"]
    logger.warning("%s %s is stale (%s changed since it was built); rebuilding it", what, path, ", ".join(changed))
    return False


def _read_if_fresh(
    path: Path, fingerprint: str, parts: Mapping[str, str], labels: Tensor, views: int
) -> Features | None:
    if not _is_fresh(path, fingerprint, parts, "image"):
        return None
    try:
        features = load_features(path)
    except ValueError as err:  # its checksum, shapes or tensors: a damaged cache is rebuilt, never used
        logger.warning("%s; rebuilding it", err)
        return None
    if not torch.equal(features.labels, labels) or features.views != views:
        logger.warning("feature cache %s does not hold these items; rebuilding it", path)
        return None
    logger.info("loaded %s cached image features from %s", tuple(features.image.shape), path)
    return features


# -- text --------------------------------------------------------------------------------------


def encode_class_texts(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    tokenizer: Callable,
    batch_size: int = 256,
    cache_path: str | os.PathLike | None = None,
) -> Tensor:
    """Raw text embeddings of every class in every template: ``(K, T, D)`` fp32, no gradient.

    ``model.set_classes(text_features=...)`` takes the result (and ensembles the
    T templates as open_clip does).

    Args:
        model: an :class:`~rada_mma.AdaptedCLIP`.
        classnames: K class names.
        templates: T templates, strings with one ``{}`` or callables ``name -> prompt``
            (see :func:`rada_mma.templates.templates_for`).
        tokenizer: the model's tokenizer.
        batch_size: prompts per forward pass.
        cache_path: keep them in a safetensors file, fingerprinted by the model's weights and the token ids.

    Example:
        >>> text = encode_class_texts(model, splits.classnames, templates_for("OxfordPets"), tokenizer=tok)
        >>> model.set_classes(text_features=text)
    """
    _frozen_model(model)
    classnames, templates = list(classnames), list(templates)
    if not classnames or not templates:
        raise ValueError("give at least one class name and one template")
    tokens = model.tokenize_prompts(classnames, tokenizer=tokenizer, templates=templates)  # (K, T, L)
    path = Path(cache_path) if cache_path is not None else None
    fingerprint = parts = None
    if path is not None:
        # fingerprinted as (K·T, L) rows, as before tokenize_prompts: existing caches stay valid
        if isinstance(tokens, Mapping):
            rows = {k: v.flatten(0, 1) if isinstance(v, Tensor) else v for k, v in tokens.items()}
        else:
            rows = tokens.flatten(0, 1)
        parts = {
            "format": f"{FORMAT}/{FORMAT_VERSION}",
            "model": f"{type(model.base).__module__}.{type(model.base).__qualname__}/backend={model.backend.name}",
            "weights": weights_digest(model.base),
            "tokens": _tokens_digest(rows),
            "shape": f"{len(classnames)}x{len(templates)}",
        }
        fingerprint = _fingerprint(parts)
        cached = _read_text_if_fresh(path, fingerprint, parts)
        if cached is not None:
            return cached
    device = model_device(model.base)
    was_training = model.base.training
    model.base.eval()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            text = model.encode_class_tokens(tokens, batch_size=batch_size).cpu()  # (K, T, D), fp32
    finally:
        model.base.train(was_training)
    if path is not None and rank_world()[0] == 0:
        _write(path, {"text": text}, {"kind": "text", "fingerprint": fingerprint, "parts": json.dumps(parts)})
    return text


def _tokens_digest(tokens: Any) -> str:
    digest = hashlib.sha256()
    tensors = sorted(tokens.items()) if isinstance(tokens, Mapping) else [("input_ids", tokens)]
    for name, value in tensors:
        if isinstance(value, Tensor):
            digest.update(f"{name}|{value.dtype}|{tuple(value.shape)};".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_text_if_fresh(path: Path, fingerprint: str, parts: Mapping[str, str]) -> Tensor | None:
    if not _is_fresh(path, fingerprint, parts, "text"):
        return None
    try:
        tensors, _ = _read(path, TEXT_TENSORS)
    except ValueError as err:
        logger.warning("%s; rebuilding it", err)
        return None
    logger.info("loaded cached class text features %s from %s", tuple(tensors["text"].shape), path)
    return tensors["text"]


# -- files -------------------------------------------------------------------------------------


def save_features(features: Features, path: str | os.PathLike, *, parts: Mapping[str, str] | None = None) -> Path:
    """Write image features to a safetensors file (temporary file, then rename).

    The file holds exactly the tensors ``image`` and ``labels``; its metadata
    holds the format, the fingerprint and (when given) its parts, which let a
    later run say what changed.

    Args:
        features: what to save.
        path: destination; its folder is created if needed.
        parts: the fingerprint's parts (:func:`fingerprint_parts`).
    """
    meta = {"kind": "image", "fingerprint": features.fingerprint, "views": str(features.views)}
    if parts is not None:
        meta["parts"] = json.dumps(dict(parts), sort_keys=True)
    tensors = {"image": features.image.float(), "labels": features.labels.to(torch.int64)}
    return _write(Path(path), tensors, meta)


def load_features(path: str | os.PathLike) -> Features:
    """Read a file written by :func:`save_features` (or by :func:`extract_image_features`)."""
    path = Path(path)
    tensors, meta = _read(path, IMAGE_TENSORS)
    if meta.get("kind") != "image":
        raise ValueError(f"{path} holds {meta.get('kind')!r} features, not image features")
    image, labels = tensors["image"], tensors["labels"]
    if image.dim() not in (2, 3) or labels.dim() != 1 or image.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path} is inconsistent: image {tuple(image.shape)}, labels {tuple(labels.shape)}; delete it and extract again"
        )
    return Features(image=image, labels=labels, fingerprint=meta.get("fingerprint", ""))


def tensors_checksum(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order: what a cache file must still hold."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _write(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "rada_mma_version": __version__, **meta,
            "checksum": tensors_checksum(tensors)}
    return save_safetensors(path, tensors, meta)


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ValueError(f"not a readable safetensors file ({err})") from err


def _read(path: Path, expected: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"no feature file at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); delete it and extract again") from err
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a rada_mma feature file (metadata format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has feature format version {meta.get('format_version')!r}, this rada_mma reads {FORMAT_VERSION!r}; "
            "extract the features again"
        )
    if sorted(tensors) != sorted(expected):
        raise ValueError(f"{path} holds tensors {sorted(tensors)}, expected {sorted(expected)}; extract the features again")
    if meta.get("checksum") != tensors_checksum(tensors):
        raise ValueError(
            f"{path} is damaged: its tensors do not match the checksum written with them (altered or corrupted "
            "on disk); delete it and extract again"
        )
    return tensors, meta

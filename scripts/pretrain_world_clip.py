"""Pretrain the demo world's small CLIP: contrastive training of an open_clip model on rendered scenes.

    python scripts/pretrain_world_clip.py                      # the shipped weights (CPU: about an hour)
    python scripts/pretrain_world_clip.py --steps 300 --out /tmp/quick   # a quick check

Every step renders a fresh batch of scenes in the pretraining style
(:class:`rada_mma.demo.world.Style`, filled shapes on flat backgrounds, the
(shape, colour) pairs of ``HELD_OUT`` never drawn), captions them, and takes one
AdamW step on CLIP's symmetric InfoNCE loss. Batches are seeded by
``(seed, step)``, so a run is reproducible and resumes exactly from its
checkpoint. Every ``--eval-every`` steps it reports zero-shot accuracy on
held-out pretraining-style images (per attribute) and on the demo's downstream
tasks (drawn in their shifted styles).

It writes ``OUT/world-clip.json`` (the open_clip config) and
``OUT/world-clip.safetensors`` (fp16 weights; the metadata records the seed,
steps, data size, final loss and accuracies and the command), which is what
``rada_mma/demo/assets`` ships. Load them with::

    open_clip.add_model_config("world-clip.json")
    model, _, preprocess = open_clip.create_model_and_transforms("world-clip", pretrained="world-clip.safetensors")
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rada_mma.demo import world

# The architecture: a small modified ResNet (CLIP's RN design) for 64×64 images and a
# 3-layer text transformer over open_clip's bundled BPE vocabulary (49408 tokens, which
# make most of the weights: the token table is 49408 × 64).
ARCH = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": world.IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
NAME = "world-clip"
TRAINING_ARGS = ("steps", "batch_size", "lr", "weight_decay", "warmup", "seed")  # what the weights depend on
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # open_clip's default preprocessing
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="rada_mma/demo/assets", help="where world-clip.json and world-clip.safetensors go")
    p.add_argument("--work-dir", default="runs/pretrain-world-clip", help="checkpoints and the log (resumed from)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=150, help="linear warm-up steps, then cosine decay to 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-images", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for training (1: on a shared CPU, OpenMP threads that wait for each "
                   "other can run ten times slower)")
    p.add_argument("--workers", type=int, default=1, help="processes rendering the next batches (0: render inline)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --work-dir")
    p.add_argument("--ship-logit-scale", type=float, default=100.0,
                   help="the logit scale the written weights carry (default 100, OpenAI CLIP's; 0 keeps the learned "
                   "one). It changes no zero-shot prediction, only how sharp the logits are, which RAda's inputs "
                   "and the adapters' recipes assume. The learned scale is recorded in the metadata")
    return p.parse_args(argv)


def build_model(device: str, *, config_dir: Path):
    import open_clip

    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / f"{NAME}.json"
    path.write_text(json.dumps(ARCH, indent=4) + "\n")
    open_clip.add_model_config(path)
    model = open_clip.create_model(NAME, device=device)
    return model, open_clip.get_tokenizer(NAME)


def to_input(images: torch.Tensor, device: str) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 -> normalised ``(N, 3, H, W)`` as open_clip's preprocessing gives it."""
    x = images.permute(0, 3, 1, 2).float() / 255
    return ((x - MEAN) / STD).to(device)


# How often each attribute is the one a family's members differ in: the hard ones most.
VARY = {"shape": 0.4, "texture": 0.2, "size": 0.15, "colour": 0.1, "position": 0.1, "background": 0.05}


def batch(seed: int, step: int, size: int, family: int = 4) -> tuple[torch.Tensor, list[str]]:
    """The images and captions of one step: ``size / family`` families of similar scenes.

    A family is a random scene and ``family - 1`` copies that each differ from it in
    one attribute (shape most often, see :data:`VARY`); every caption of a family
    names the attributes its members differ in. The batch so holds negatives that
    only the hard attributes tell apart, and CLIP cannot get by on colour and position.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    groups = size // family
    scenes = world.sample_scenes(size, generator=g, exclude=world.HELD_OUT)  # fresh nuisances for every member
    keys = list(VARY)
    head = torch.arange(size) - torch.arange(size) % family  # the index of each member's family head
    member = torch.arange(size) != head
    vary = torch.multinomial(torch.tensor(list(VARY.values())), size, replacement=True, generator=g)
    for key in world.ATTRIBUTES:
        values = getattr(scenes, key)
        values.copy_(values[head])
    banned = torch.zeros(len(world.SHAPES), len(world.COLOURS), dtype=torch.bool)
    for shape, colour in world.HELD_OUT:
        banned[world.SHAPES.index(shape), tuple(world.COLOURS).index(colour)] = True
    todo = member.clone()
    while todo.any():  # each member gets another value of its attribute, never a held-out (shape, colour) pair
        for k, key in enumerate(keys):
            chosen = todo & (vary == k)
            count = len(world.ATTRIBUTES[key])
            values = getattr(scenes, key)
            values[chosen] = (values[head[chosen]] + torch.randint(1, count, (int(chosen.sum()),), generator=g)) % count
        todo = member & banned[scenes.shape, scenes.colour]
    always = [[keys[int(vary[j])] for j in range(f, f + family) if j != f] for f in range(0, groups * family, family)]
    named = [always[i // family] if i < groups * family else [] for i in range(size)]
    return world.render(scenes, generator=g), world.captions(scenes, generator=g, always=named)


class Batches(torch.utils.data.IterableDataset):
    """The batches of steps ``start, start + 1, ...``: rendered ahead in a worker process."""

    def __init__(self, seed: int, start: int, steps: int, size: int):
        self.seed, self.start, self.steps, self.size = seed, start, steps, size

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield batch(self.seed, step, self.size)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def lr_at(args: argparse.Namespace, step: int) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return 0.5 * args.lr * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def zero_shot(model, tokenizer, images: torch.Tensor, prompts: list[str], labels: torch.Tensor, device: str) -> float:
    """Accuracy in percent of picking ``prompts[label]`` for each image."""
    text = F.normalize(model.encode_text(tokenizer(prompts).to(device)), dim=-1)
    feats = torch.cat([model.encode_image(to_input(images[i : i + 256], device)) for i in range(0, len(images), 256)])
    pred = (F.normalize(feats, dim=-1) @ text.T).argmax(-1).cpu()
    return 100.0 * float((pred == labels).float().mean())


@torch.no_grad()
def evaluate(model, tokenizer, args: argparse.Namespace) -> dict[str, float]:
    """Zero-shot accuracies: each attribute on held-out pretraining-style scenes, and the downstream tasks."""
    model.eval()
    g = torch.Generator().manual_seed(10_000 + args.seed)
    scenes = world.sample_scenes(args.eval_images, generator=g)
    images = world.render(scenes, generator=g)
    prompts = {
        "shape": [f"a photo of a {s}." for s in world.SHAPES],
        "colour": [f"a photo of a {c} shape." for c in world.COLOURS],
        "size": [f"a photo of a {s} shape." for s in world.SIZES],
        "position": [f"a photo of a shape in the {p}." for p in world.POSITIONS],
        "texture": [f"a photo of a {t} shape." for t in world.TEXTURES],
        "background": [f"a photo of a shape on a {b} background." for b in world.BACKGROUNDS],
    }
    out = {key: zero_shot(model, tokenizer, images, p, getattr(scenes, key), args.device) for key, p in prompts.items()}
    pairs = [(s, c) for s in world.SHAPES for c in world.COLOURS]
    pair_label = scenes.shape * len(world.COLOURS) + scenes.colour
    held = torch.tensor([(world.SHAPES[s], tuple(world.COLOURS)[c]) in world.HELD_OUT
                         for s, c in zip(scenes.shape.tolist(), scenes.colour.tolist(), strict=True)])
    text = [f"a photo of a {c} {s}." for s, c in pairs]
    if held.any():
        out["pair_seen"] = zero_shot(model, tokenizer, images[~held], text, pair_label[~held], args.device)
        out["pair_held_out"] = zero_shot(model, tokenizer, images[held], text, pair_label[held], args.device)
    for task in world.TASKS.values():
        data = task.render("test", per_class=32)
        half = math.ceil(len(task.classnames) / 2)
        base = data.labels < half
        prompts_task = [f"a photo of a {c}." for c in task.classnames]
        out[f"{task.name}_base"] = zero_shot(model, tokenizer, data.images[base], prompts_task[:half], data.labels[base], args.device)
        out[f"{task.name}_new"] = zero_shot(
            model, tokenizer, data.images[~base], prompts_task[half:], data.labels[~base] - half, args.device
        )
    model.train()
    return out


PRETRAINING_METRICS = (*world.ATTRIBUTES, "pair_seen", "pair_held_out")


def save_weights(model, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.chmod(0o644)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out, work = Path(args.out), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_model(args.device, config_dir=out)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    ckpt_path, log_path = work / "checkpoint.pt", work / "log.jsonl"
    start, losses = 0, []
    if ckpt_path.exists() and not args.fresh:
        ckpt = torch.load(ckpt_path, map_location=args.device, weights_only=True)
        if any(ckpt["args"].get(k) != getattr(args, k) for k in TRAINING_ARGS):
            sys.exit(f"{ckpt_path} was made with other training arguments; pass --fresh or another --work-dir")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, losses = ckpt["step"], ckpt["losses"]
        print(f"resuming at step {start}", flush=True)
    keyed = {k: v for k, v in vars(args).items() if k not in ("fresh", "threads", "device", "ship_logit_scale")}
    labels = torch.arange(args.batch_size, device=args.device)
    model.train()
    began, metrics = time.time(), {}
    loader = torch.utils.data.DataLoader(
        Batches(args.seed, start, args.steps, args.batch_size), batch_size=None, num_workers=args.workers,
        worker_init_fn=_one_thread, prefetch_factor=4 if args.workers else None, persistent_workers=False,
    )
    for step, (images, texts) in zip(range(start, args.steps), loader, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(args, step)
        image_features, text_features, scale = model(to_input(images, args.device), tokenizer(texts).to(args.device))
        logits = scale * image_features @ text_features.T  # (B, B): features come normalised
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        last = step + 1 == args.steps
        if (step + 1) % 25 == 0 or last:
            recent = sum(losses[-25:]) / len(losses[-25:])
            rate = (step + 1 - start) / (time.time() - began)
            print(f"step {step + 1}/{args.steps} loss {recent:.3f} scale {float(scale.detach()):.1f} "
                  f"lr {lr_at(args, step):.2e} {rate:.2f} steps/s", flush=True)
        if (step + 1) % args.eval_every == 0 or last:
            metrics = evaluate(model, tokenizer, args)
            record = {"step": step + 1, "loss": sum(losses[-50:]) / len(losses[-50:]), **metrics}
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in record.items()}), flush=True)
            with log_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                        "losses": losses, "args": keyed}, tmp)
            tmp.replace(ckpt_path)
    if not metrics:  # the checkpoint was already complete: only write the weights again
        metrics = evaluate(model, tokenizer, args)
    final_loss = sum(losses[-100:]) / len(losses[-100:])
    learned_scale = float(model.logit_scale.detach().exp())
    if args.ship_logit_scale:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(args.ship_logit_scale))
    command = "python scripts/pretrain_world_clip.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    metadata = {
        "format": "rada_mma.world_clip",
        "model": NAME,
        "world_version": world.WORLD_VERSION,
        "seed": str(args.seed),
        "steps": str(args.steps),
        "batch_size": str(args.batch_size),
        "images_seen": str(args.steps * args.batch_size),
        "lr": str(args.lr),
        "final_loss": f"{final_loss:.4f}",  # mean InfoNCE over the last 100 steps
        "learned_logit_scale": f"{learned_scale:.2f}",
        "logit_scale": f"{float(model.logit_scale.detach().exp()):.2f}",
        # zero-shot accuracy (%) on held-out pretraining-style scenes, per attribute and (shape, colour) pair
        "zero_shot": json.dumps({k: round(v, 2) for k, v in metrics.items() if k in PRETRAINING_METRICS}),
        "command": command.strip(),
        "torch": torch.__version__,
    }
    save_weights(model, out / f"{NAME}.safetensors", metadata)
    print(f"wrote {out / (NAME + '.json')} and {out / (NAME + '.safetensors')}: loss {final_loss:.3f}, {metrics}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

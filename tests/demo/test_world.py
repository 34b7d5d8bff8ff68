"""The demo world: seeded rendering, attributes that show, captions, tasks, and the shipped CLIP."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from rada_mma.demo import WORLD_CONFIG, WORLD_WEIGHTS, world


def scenes(n: int, seed: int = 0, **fixed) -> world.Scenes:
    return world.sample_scenes(n, generator=torch.Generator().manual_seed(seed), **fixed)


def draw(s: world.Scenes, style: world.Style | None = None, seed: int = 0) -> torch.Tensor:
    return world.render(s, style, generator=torch.Generator().manual_seed(seed))


# -- rendering -------------------------------------------------------------------------------


def test_render_is_seeded_and_shaped():
    a = draw(scenes(16, seed=3), seed=5)
    b = draw(scenes(16, seed=3), seed=5)
    assert a.shape == (16, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, draw(scenes(16, seed=4), seed=5))  # other scenes
    assert not torch.equal(a, draw(scenes(16, seed=3), seed=6))  # other pixel noise


def test_render_is_fast():
    s = scenes(256)
    start = time.perf_counter()
    draw(s)
    assert time.perf_counter() - start < 5.0  # about 0.2 s on one core: a batch must never take seconds


@pytest.mark.parametrize("shape", world.SHAPES)
def test_every_shape_draws_a_compact_object_of_its_colour(shape):
    s = scenes(1, shape=shape, colour="red", size="large", position="center", texture="plain", background="black")
    image = draw(s, world.Style(noise=0.0, jitter=0.0))[0].float() / 255
    red = (image[..., 0] > 0.6) & (image[..., 1] < 0.35)  # (H, W)
    area = red.float().mean().item()
    assert 0.04 < area < 0.5, f"{shape} covers {area:.2f} of the image"
    ys, xs = torch.nonzero(red, as_tuple=True)
    centre = (xs.float().mean().item(), ys.float().mean().item())
    assert all(abs(c - world.IMAGE_SIZE / 2) < 8 for c in centre), f"{shape} is centred at {centre}"


def test_shapes_differ():
    masks = []
    for shape in world.SHAPES:
        s = scenes(1, shape=shape, colour="red", size="large", position="center", texture="plain", background="black")
        s.rotation.zero_()
        masks.append(draw(s, world.Style(noise=0.0, jitter=0.0))[0, ..., 0] > 128)
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            differ = (masks[i] ^ masks[j]).float().mean().item()
            assert differ > 0.01, f"{world.SHAPES[i]} and {world.SHAPES[j]} look alike"


def test_attributes_show_in_the_pixels():
    base = dict(shape="square", colour="blue", size="medium", position="center", texture="plain", background="white")
    plain = draw(scenes(1, **base), world.Style(noise=0.0))[0].float()
    for key, other in (("colour", "yellow"), ("size", "large"), ("position", "top left"),
                       ("texture", "striped"), ("background", "black")):
        changed = draw(scenes(1, **{**base, key: other}), world.Style(noise=0.0))[0].float()
        moved = ((plain - changed).abs().amax(-1) > 30).float().mean()  # share of pixels that visibly change
        assert moved > 0.03, f"changing the {key} changes only {moved:.1%} of the pixels"


def test_outline_style_keeps_only_the_edge():
    s = scenes(1, shape="circle", colour="red", size="large", position="center", texture="plain", background="black")
    filled = (draw(s, world.Style(noise=0.0))[0, ..., 0] > 128).float().mean()
    outline = (draw(s, world.Style(noise=0.0, outline=0.3))[0, ..., 0] > 128).float().mean()
    assert 0.25 * filled < outline < 0.75 * filled


def test_sample_scenes_fixes_and_excludes():
    s = scenes(200, shape="star")
    assert (s.shape == world.SHAPES.index("star")).all()
    s = world.sample_scenes(2000, generator=torch.Generator().manual_seed(0), exclude=world.HELD_OUT)
    pairs = {(world.SHAPES[a], tuple(world.COLOURS)[b]) for a, b in zip(s.shape.tolist(), s.colour.tolist(), strict=True)}
    assert not pairs & set(world.HELD_OUT)
    assert len(pairs) == len(world.SHAPES) * len(world.COLOURS) - len(world.HELD_OUT)  # every other pair occurs
    with pytest.raises(ValueError, match="unknown shape"):
        scenes(1, shape="blob")
    with pytest.raises(TypeError, match="unknown attribute"):
        scenes(1, weight="heavy")
    with pytest.raises(ValueError, match="only allow excluded"):
        world.sample_scenes(1, generator=torch.Generator(), exclude=world.HELD_OUT, shape="circle", colour="purple")


def test_style_checks_its_values():
    with pytest.raises(ValueError, match="outline"):
        world.Style(outline=1.0)
    with pytest.raises(ValueError, match="tint"):
        world.Style(tint=(1.0, 1.0))


# -- captions --------------------------------------------------------------------------------


def test_caption_names_the_attributes():
    names = {"shape": "star", "colour": "red", "size": "large", "position": "top left",
             "texture": "striped", "background": "white"}
    assert world.caption(names) == "a large red striped star in the top left on a white background."
    assert world.caption(names, keep={k: False for k in world.ATTRIBUTES}) == "a shape."
    short = world.caption({**names, "texture": "plain"}, keep={"size": False, "position": False, "background": False})
    assert short == "a red star."


def test_captions_are_seeded_and_describe_the_scene():
    s = scenes(64, seed=1)
    a = world.captions(s, generator=torch.Generator().manual_seed(2))
    assert a == world.captions(s, generator=torch.Generator().manual_seed(2))
    for i, text in enumerate(a):
        names = s.names(i)
        words = set(text.rstrip(".").split())
        assert names["shape"] in words or "shape" in words
        named_colours = words & set(world.COLOURS)
        assert named_colours <= {names["colour"]}, f"{text!r} names a colour the scene does not have"
        assert text.endswith(".") and len(text.split()) <= 18


def test_captions_fit_the_context():
    import open_clip

    config = json.loads(WORLD_CONFIG.read_text())
    tokenizer = open_clip.SimpleTokenizer(context_length=config["text_cfg"]["context_length"])
    longest = "a picture of a medium yellow checkered hexagon in the bottom right on a white background."
    tokens = tokenizer([longest])[0]
    assert tokens[-1] == 0, "the longest caption does not fit the world CLIP's context"


# -- tasks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(world.TASKS.values()), ids=list(world.TASKS))
def test_tasks_render_their_classes(task):
    data = task.render("train", per_class=3)
    classes = len(task.classes)
    assert data.images.shape == (3 * classes, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert data.labels.tolist() == [y for y in range(classes) for _ in range(3)]
    assert torch.equal(data.images, task.render("train", per_class=3).images)
    assert not torch.equal(data.images, task.render("test", per_class=3).images)
    assert len(set(task.classnames)) == classes and 10 <= classes <= 20
    with pytest.raises(ValueError, match="split"):
        task.render("dev")


def test_checkerboard_puts_every_word_on_both_sides():
    classes = world.checkerboard(("circle", "star"), ("red", "blue"))
    assert [dict(c)["shape"] + "/" + dict(c)["colour"] for c in classes] == [
        "circle/red", "star/blue", "circle/blue", "star/red"
    ]


def test_shapes_task_new_classes_hold_the_held_out_pairs():
    task = world.TASKS["WorldShapes"]
    half = math.ceil(len(task.classes) / 2)
    pairs = [(dict(c)["shape"], dict(c)["colour"]) for c in task.classes]
    held = set(pairs) & set(world.HELD_OUT)
    assert len(held) == 4 and held <= set(pairs[half:])  # never seen together in pretraining, all new
    for side in (pairs[:half], pairs[half:]):
        assert {s for s, _ in side} == {s for s, _ in pairs} and {c for _, c in side} == {c for _, c in pairs}


# -- the shipped CLIP ------------------------------------------------------------------------


def test_shipped_weights_are_small_fp16_with_their_record():
    from safetensors import safe_open

    assert WORLD_WEIGHTS.stat().st_size <= 10_000_000
    with safe_open(str(WORLD_WEIGHTS), framework="pt") as fh:
        meta = fh.metadata()
        dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}
    assert "F32" not in dtypes
    assert meta["world_version"] == world.WORLD_VERSION
    for key in ("seed", "steps", "images_seen", "final_loss", "zero_shot", "command", "learned_logit_scale"):
        assert meta.get(key), f"the weights' metadata lacks {key}"
    assert meta["command"].startswith("python scripts/pretrain_world_clip.py")


def test_shipped_clip_loads_offline_through_open_clip(monkeypatch):
    import socket

    import open_clip

    def no_network(*args, **kwargs):
        raise AssertionError("the world CLIP must load without the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    open_clip.add_model_config(WORLD_CONFIG)
    model, _, preprocess = open_clip.create_model_and_transforms("world-clip", pretrained=str(WORLD_WEIGHTS))
    tokenizer = open_clip.get_tokenizer("world-clip")
    assert next(model.parameters()).dtype == torch.float32
    model.eval()
    s = scenes(40, seed=7, size="large", texture="plain")
    images = torch.stack([preprocess(_pil(x)) for x in draw(s)])
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(tokenizer([f"a photo of a {c} shape." for c in world.COLOURS])), dim=-1)
    accuracy = ((image @ text.T).argmax(-1) == s.colour).float().mean().item()
    assert accuracy > 0.8, f"the world CLIP names the colour of only {accuracy:.0%} of pretraining-style images"


def _pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(image.numpy())

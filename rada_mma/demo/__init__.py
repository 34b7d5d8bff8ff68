"""The demo: a small CLIP and the procedurally generated world it was pretrained on, and the demo job.

- :mod:`.world`: seeded, vectorised images and captions; the downstream tasks;
- :mod:`.runner`: ``rada-mma demo`` (every adapter on the world's tasks: base-to-new, and with ``setting=`` the
  all-class, cross-dataset, domain-generalisation and test-time settings);
- ``assets/``: the shipped world CLIP (open_clip JSON config + fp16 safetensors).

>>> from rada_mma.demo import load_world_clip
>>> model, preprocess, tokenizer = load_world_clip()     # offline, 4.7 M parameters
"""

from __future__ import annotations

from . import world
from .runner import (
    DEMO_METHODS,
    DEMO_SETTINGS,
    DEMO_SHOTS,
    WORLD_CONFIG,
    WORLD_MODEL,
    WORLD_WEIGHTS,
    gains,
    load_world_clip,
    planned_runs,
    published_table,
    run_demo,
    with_world_clip,
    write_samples,
    write_task,
)

__all__ = [
    "DEMO_METHODS",
    "DEMO_SETTINGS",
    "DEMO_SHOTS",
    "WORLD_CONFIG",
    "WORLD_MODEL",
    "WORLD_WEIGHTS",
    "gains",
    "load_world_clip",
    "planned_runs",
    "published_table",
    "run_demo",
    "with_world_clip",
    "world",
    "write_samples",
    "write_task",
]

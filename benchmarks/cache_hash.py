"""What hashing every image's bytes costs the feature cache, against the extraction it guards.

The cache's fingerprint must change when an image changes. Size and
modification time (``data_hash="stat"``) miss an edit that keeps both; hashing
every byte (``"content"``, sha256, streamed) cannot. This script measures the
price of ``"content"`` on the demo world: the shipped world CLIP and the
``WorldShapes`` task written as the demo writes it (16 classes, 32 train, 8 val
and 50 test PNGs per class, 64x64).

Timed, each ``--repeats`` times (alternating, median kept), wall clock and CPU
time (``time.process_time``):

- ``stat`` and ``content``: :func:`rada_mma.fewshot.cache.data_digest` of every
  image of the task, alone;
- ``extract``: :func:`rada_mma.fewshot.extract_image_features` of the same
  images with ``data_hash="stat"`` and no cache file: decoding, preprocessing,
  the image encoder (batches of ``--batch-size``) and the fingerprint;
- ``reuse``: the same call when its cache file is fresh (what a repeated
  ``fit`` pays), once per mode.

The images were just written, so both the hash and the decoder read them from
the page cache; on a cold disk both wait for the same reads. The result:
``overhead = (content - stat) / extract``; the issue asked for content hashing
by default if it stays under 10 %.

Usage, from the repository root::

    python benchmarks/cache_hash.py            # benchmarks/results/cache_hash_cpu.json and .md
    python benchmarks/cache_hash.py --quick --json /tmp/hash.json     # seconds: 2 images per class and split
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: the repository root, for benchmarks.common

from benchmarks.common import RESULTS, environment, load_average, write_results  # noqa: E402
from rada_mma import wrap  # noqa: E402
from rada_mma.demo import load_world_clip, world, write_task  # noqa: E402
from rada_mma.fewshot import extract_image_features, load_data  # noqa: E402
from rada_mma.fewshot.cache import data_digest  # noqa: E402

TARGET = 0.10  # content hashing is the default if it costs less than this fraction of the extraction


def timed(fn) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def median_of(samples: list[tuple[float, float]]) -> dict[str, float]:
    return {"seconds": statistics.median(s[0] for s in samples), "cpu_seconds": statistics.median(s[1] for s in samples),
            "samples": [round(s[0], 5) for s in samples]}


def measure(args: argparse.Namespace, folder: Path) -> dict:
    task = world.TASKS["WorldShapes"]
    if args.quick:
        task = dataclasses.replace(task, counts=(2, 1, 2))
    splits = load_data(write_task(task, folder), name=task.name)
    items = splits.train + splits.val + splits.test
    clip, preprocess, _ = load_world_clip()
    model = wrap(clip, method="rada")
    size = sum(splits.path(item).stat().st_size for item in items)

    def extract(**kwargs):
        return extract_image_features(model, splits, items, preprocess, batch_size=args.batch_size, progress=False,
                                      data_hash="stat", **kwargs)

    samples: dict[str, list[tuple[float, float]]] = {"stat": [], "content": [], "extract": []}
    for _ in range(args.repeats):
        samples["stat"].append(timed(lambda: data_digest(splits, items, "stat")))
        samples["content"].append(timed(lambda: data_digest(splits, items, "content")))
        samples["extract"].append(timed(extract))
    reuse = {}
    for mode in ("stat", "content"):
        cache = folder / f"cache-{mode}.safetensors"
        extract_image_features(model, splits, items, preprocess, batch_size=args.batch_size, progress=False,
                               data_hash=mode, cache_path=cache)
        reuse[mode] = median_of([timed(lambda m=mode, c=cache: extract_image_features(
            model, splits, items, preprocess, batch_size=args.batch_size, progress=False, data_hash=m, cache_path=c))
            for _ in range(args.repeats)])
    timings = {name: median_of(values) for name, values in samples.items()}
    extra = timings["content"]["seconds"] - timings["stat"]["seconds"]
    extra_cpu = timings["content"]["cpu_seconds"] - timings["stat"]["cpu_seconds"]
    return {
        "images": len(items), "megabytes": round(size / 2**20, 2), "timings": timings, "reuse": reuse,
        "overhead": extra / timings["extract"]["seconds"],
        "overhead_cpu": extra_cpu / timings["extract"]["cpu_seconds"],
        "content_megabytes_per_second": size / 2**20 / timings["content"]["seconds"],
        "target": TARGET,
    }


def markdown(result: dict) -> str:
    t, r = result["timings"], result["reuse"]
    lines = [
        "# Content hashing in the feature cache's fingerprint (CPU)",
        "",
        f"{result['images']} images of the demo world's WorldShapes task ({result['megabytes']} MB of PNGs), the "
        f"shipped world CLIP, {result['machine']}, {result['threads']} torch thread(s), load average "
        f"{result['load_before']:.2f} before and {result['load_after']:.2f} after (a shared machine: CPU time varies "
        f"less than the wall clock). Medians of {result['repeats']} runs; how it is measured: "
        "`benchmarks/cache_hash.py`.",
        "",
        "| what | wall | CPU |",
        "|---|---:|---:|",
        f"| data digest, size + mtime (`stat`) | {1e3 * t['stat']['seconds']:.1f} ms | {1e3 * t['stat']['cpu_seconds']:.1f} ms |",
        f"| data digest, every byte (`content`) | {1e3 * t['content']['seconds']:.1f} ms | "
        f"{1e3 * t['content']['cpu_seconds']:.1f} ms |",
        f"| extraction (decode, preprocess, encode, fingerprint) | {t['extract']['seconds']:.2f} s | "
        f"{t['extract']['cpu_seconds']:.2f} s |",
        f"| reusing a fresh cache, `stat` | {1e3 * r['stat']['seconds']:.1f} ms | {1e3 * r['stat']['cpu_seconds']:.1f} ms |",
        f"| reusing a fresh cache, `content` | {1e3 * r['content']['seconds']:.1f} ms | "
        f"{1e3 * r['content']['cpu_seconds']:.1f} ms |",
        "",
        f"Content hashing adds **{100 * result['overhead']:.1f} %** to the extraction's wall time "
        f"({100 * result['overhead_cpu']:.1f} % of its CPU time; {result['content_megabytes_per_second']:.0f} MB/s), "
        f"{'under' if result['overhead'] < result['target'] else 'over'} the {100 * result['target']:.0f} % "
        f"threshold: `data_hash=\"content\"` is {'the default' if result['overhead'] < result['target'] else 'not the default'}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 train, 1 val, 2 test images per class; 1 repeat")
    parser.add_argument("--json", type=Path, default=RESULTS / "cache_hash_cpu.json", help="results (and a .md beside)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128, help="images per encoder pass (the CLI's default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    torch.set_num_threads(args.threads)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as scratch:
        result = {"benchmark": "cache_hash", **environment("cpu"), "repeats": args.repeats, "quick": args.quick,
                  **measure(args, Path(scratch))}
    result.update(load_before=load_before or 0.0, load_after=load_average() or 0.0)
    report = markdown(result)
    write_results(args.json, result, report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run folders: each belongs to one run, and one process works in it at a time.

``rada-mma fit`` and ``eval`` (:func:`rada_mma.fewshot.run_base_to_new`) hold
an exclusive lock on their folder for the whole run (:func:`claim`): a second
process aiming at the same folder stops at once with an error that names the
holder. The lock is the kernel's, so a killed run leaves nothing that blocks
the next one.

A folder records the run it belongs to in ``owner.json``: what the run depends
on (data, model, method, seed, shots, training settings, ...) and, once
written, the sha256 of its adapter. A finished run's folder is never taken over
by another run's ``fit``; an ``eval`` of another adapter (or with other data or
model) writes into ``OUT/evals/<adapter name>-<id>/``, never over the run's own
results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..io import LockHeld, exclusive_lock, write_json
from .cache import file_digest
from .distributed import broadcast_object, is_main

__all__ = ["ADAPTER_FILE", "LOCK_FILE", "OWNER_FILE", "claim", "hold", "results_folder", "run_fields"]

log = logging.getLogger(__name__)

LOCK_FILE = ".rada-mma.lock"
OWNER_FILE = "owner.json"
OWNER_FORMAT = "rada_mma.run_owner"
ADAPTER_FILE = "adapter.safetensors"
# what an evaluation depends on besides its adapter: the run's other fields are training settings
_EVAL_FIELDS = ("data", "split_file", "dataset", "templates", "draw", "rounding", "shots", "seed", "model",
                "pretrained", "model_config", "method")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    file_digest(path, digest)
    return digest.hexdigest()


def _path(value: str | None) -> str | None:
    """A path as it will be read (absolute, links resolved); a tag such as ``"openai"`` stays as it is."""
    if value is None or not Path(value).expanduser().exists():
        return value
    return str(Path(value).expanduser().resolve())


def _run_fields(spec: Any, train: bool) -> dict[str, Any]:
    fields = {
        "data": _path(spec.data), "split_file": _path(spec.split_file), "dataset": spec.dataset,
        "templates": list(spec.templates) if spec.templates else None, "draw": spec.draw, "rounding": spec.base_rounding,
        "shots": spec.shots, "seed": spec.seed, "model": spec.model, "pretrained": _path(spec.pretrained),
        "model_config": _path(spec.model_config), "method": spec.method,
    }
    if train:
        fields.update(options=dict(sorted(spec.options.items())), train=dataclasses.asdict(spec.train_config()))
    return fields


def run_fields(spec: Any) -> dict[str, Any]:
    """What a training run of ``spec`` depends on, as ``owner.json`` records it (paths resolved; the training
    settings as the preset resolves them): data, model, draw, shots, seed, method, options, train."""
    return _run_fields(spec, train=True)


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _read_owner(folder: Path) -> dict[str, Any] | None:
    path = folder / OWNER_FILE
    if not path.is_file():
        return None
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}); it says which run this folder belongs to: restore or "
                         "delete it") from err
    if not isinstance(owner, dict) or owner.get("format") != OWNER_FORMAT:
        raise ValueError(f"{path} is not a rada_mma run record; choose another out folder")
    return owner


def _flat(fields: dict[str, Any]) -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` as ``{"train.lr": 0.1}``: differences are then named field by field."""
    flat = {}
    for key, value in fields.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _differences(mine: dict[str, Any], theirs: dict[str, Any]) -> str:
    mine, theirs = _flat(mine), _flat(theirs)
    keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    return ", ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in keys[:4]) or "its record"


def _fit_may_write(folder: Path, fields: dict[str, Any]) -> None:
    """A fit writes a folder that is new, its own, or left unfinished by another fit; never a finished run."""
    owner = _read_owner(folder)
    if owner is None or owner.get("fingerprint") == _fingerprint(fields):
        return
    if owner.get("kind") == "fit" and not owner.get("adapter_sha256"):
        return  # unfinished (killed, diverged): its checkpoint, if any, is checked by fit() itself
    what = "finished run" if owner.get("kind") == "fit" else "evaluation of an adapter"
    raise FileExistsError(
        f"{folder} holds the {what} ({_differences(fields, owner.get('run', {}))}); choose another out folder, "
        "or delete that one to start over"
    )


def results_folder(spec: Any, adapter: Path | None) -> Path:
    """Where a run writes: ``spec.out_dir`` for a fit, and for an evaluation of ``adapter`` too when the
    folder is new, or belongs to the same adapter and run; otherwise ``OUT/evals/<adapter name>-<id>``."""
    out = spec.out_dir
    if adapter is None:
        return out
    fields = _run_fields(spec, train=False)
    sha = _sha256(adapter)
    owner = _read_owner(out)
    if owner is None:
        own = out / ADAPTER_FILE  # a folder from before owner.json: its adapter tells
        same = not own.is_file() or own.resolve() == adapter.resolve() or _sha256(own) == sha
    else:
        theirs = {k: owner.get("run", {}).get(k) for k in _EVAL_FIELDS}
        same = owner.get("adapter_sha256") == sha and theirs == fields
    if same:
        return out
    return out / "evals" / f"{adapter.stem}-{_fingerprint({**fields, 'adapter': sha})[:10]}"


def _record(folder: Path, spec: Any, adapter: Path | None, train: bool) -> None:
    fields = _run_fields(spec, train)
    owner = {"format": OWNER_FORMAT, "kind": "fit" if train else "eval", "run": fields,
             "fingerprint": _fingerprint(fields), "adapter_sha256": None if adapter is None else _sha256(adapter)}
    if adapter is not None:
        owner["adapter"] = str(adapter.resolve())
    write_json(folder / OWNER_FILE, owner)


def _in_use(folder: Path, held: LockHeld) -> BlockingIOError:
    h = held.holder
    return BlockingIOError(
        f"{folder} is in use by another run: process {h.get('pid', '?')} on {h.get('host', '?')}, started "
        f"{h.get('started', '?')} ({h.get('command', '?')}); wait for it to finish or choose another out folder. "
        f"If that process no longer exists (it ran on another machine sharing this disk?), delete {held.path}"
    )


def _lock(stack: contextlib.ExitStack, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        stack.enter_context(exclusive_lock(folder / LOCK_FILE))
    except LockHeld as held:
        raise _in_use(folder, held) from None


def _take(stack: contextlib.ExitStack, spec: Any, train: bool, adapter: Path | None) -> Path:
    """Lock the run's folder (and an evaluation's own folder); check that this run may write there."""
    _lock(stack, spec.out_dir)
    folder = spec.out_dir if train else results_folder(spec, adapter)
    if folder != spec.out_dir:
        _lock(stack, folder)
    if train:
        _fit_may_write(folder, _run_fields(spec, train=True))
    return folder


# the errors rank 0 may meet, rebuilt by name on the other ranks (exceptions do not all survive pickling)
_ERRORS = {e.__name__: e for e in (BlockingIOError, FileExistsError, FileNotFoundError, OSError, ValueError)}


def _on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result on every rank; its error raised on every rank, so that none waits forever."""
    result, failure, error = None, None, None
    if is_main():
        try:
            result = fn()
        except (OSError, ValueError) as err:
            error, failure = err, (type(err).__name__, str(err))
    result, failure = broadcast_object((result, failure))
    if error is not None:
        raise error
    if failure is not None:
        raise _ERRORS.get(failure[0], OSError)(failure[1])
    return result


@contextlib.contextmanager
def hold(folder: str | Path) -> Iterator[Path]:
    """Lock ``folder`` for a ``with`` block (rank 0 holds it); another process in it is an error naming its pid.

    Example:
        >>> with hold("runs/bench"):
        ...     run_grid(...)
    """
    folder = Path(folder).expanduser()
    with contextlib.ExitStack() as stack:
        _on_main(lambda: _lock(stack, folder))
        yield folder


@contextlib.contextmanager
def claim(spec: Any, *, train: bool, adapter: Path | None = None) -> Iterator[Any]:
    """Hold the run folder of ``spec`` (a :class:`~rada_mma.fewshot.RunSpec`) for a ``with`` block.

    Locks the folder (another process in it is an error naming its pid), checks that this run may
    write there, records the run in ``owner.json``, and gives the spec to run: ``spec`` itself, or for
    an evaluation of another adapter, ``spec`` writing to ``OUT/evals/<adapter name>-<id>`` (sharing
    ``OUT``'s feature cache). Leaving the block by any exit releases the lock; a fit that wrote its
    adapter records the adapter's sha256. Under ``torchrun`` rank 0 holds the lock and every rank
    stops if it cannot.

    Args:
        spec: the run.
        train: a fit (``True``) or an evaluation of ``adapter``.
        adapter: the adapter file an evaluation reads.
    """
    with contextlib.ExitStack() as stack:
        folder = Path(_on_main(lambda: str(_take(stack, spec, train, adapter))))
        run = spec if folder == spec.out_dir else spec.replace(out=str(folder), cache_dir=str(spec.cache_folder()))
        if run is not spec:
            log.warning("%s holds another adapter's run (or one with other data, model or draw): the results of %s "
                        "go to %s", spec.out_dir, adapter, folder)
        if is_main():
            _record_start(folder, run, train, adapter)
        yield run
        if train and is_main() and (folder / ADAPTER_FILE).is_file():
            _record(folder, run, folder / ADAPTER_FILE, train=True)


def _record_start(folder: Path, spec: Any, train: bool, adapter: Path | None) -> None:
    """A fit takes a new or unfinished folder; an evaluation a new one. A folder's own run keeps its record."""
    owner = _read_owner(folder)
    if owner is not None and owner.get("fingerprint") == _fingerprint(_run_fields(spec, train)):
        return
    if train or owner is None:
        _record(folder, spec, None if train else adapter, train)

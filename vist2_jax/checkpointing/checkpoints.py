"""Orbax checkpoints of a run (``WORKDIR/checkpoints``): train state, Grain iterator state, resolved config, the
tokenizer and the renderer config, saved asynchronously with a keep-N policy. ``WORKDIR`` may be local or ``gs://`` (Orbax
writes arrays through TensorStore, the small files through ``etils.epath``).

Restore walks back from the newest step: a checkpoint that cannot be read (truncated or
corrupted files) is reported in one log line and the previous good one is used.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from typing import Any

import grain
import orbax.checkpoint as ocp

from vist2_jax import storage

log = logging.getLogger(__name__)


def tokenizer_asset(tokenizer) -> dict:
    """The tokenizer as a JSON-able record (SentencePiece model bytes, base64)."""
    name = getattr(tokenizer, "path", "")
    path = storage.as_path(name) if name else None
    if path is None or not path.is_file():
        return {"kind": type(tokenizer).__name__, "file": name}
    data = path.read_bytes()
    return {"kind": type(tokenizer).__name__, "file": path.name, "sha256": hashlib.sha256(data).hexdigest(),
            "base64": base64.b64encode(data).decode()}


def write_tokenizer_asset(asset: dict, directory: storage.PathLike):
    """Recreate the tokenizer file saved by :func:`tokenizer_asset`; returns its path."""
    if "base64" not in asset:
        raise ValueError(f"checkpoint holds no tokenizer bytes (kind {asset.get('kind')}, file {asset.get('file')})")
    return storage.write_atomic(storage.as_path(directory) / asset["file"], base64.b64decode(asset["base64"]))


class RunCheckpoints:
    """A ``CheckpointManager`` over ``WORKDIR/checkpoints`` with the items of a run."""

    def __init__(self, workdir: storage.PathLike, keep: int, async_save: bool = True):
        self.directory = storage.absolute(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.unreadable: dict[int, str] = {}  # step -> reason, filled by restore_latest

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict, data_iterator: Any, config: dict, tokenizer: dict,
             renderer: dict, force: bool = False) -> bool:
        """Params and optimizer state are separate items so a later stage can read params alone."""
        items = {"params": ocp.args.StandardSave(state["params"]),
                 "opt_state": ocp.args.StandardSave(state["opt_state"]),
                 "config": ocp.args.JsonSave(config), "tokenizer": ocp.args.JsonSave(tokenizer),
                 "renderer": ocp.args.JsonSave(renderer)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state: dict, data_iterator: Any = None,
                       params_only: bool = False, only_step: int | None = None) -> tuple[int, dict] | None:
        """(step, state) of the newest readable checkpoint; the iterator is restored in place.

        ``abstract_state`` holds ShapeDtypeStructs with shardings; with ``params_only`` only
        ``abstract_state["params"]`` is needed and read. Unreadable steps land in
        ``self.unreadable`` with their reason.
        """
        for step in reversed(self.steps() if only_step is None else [only_step]):
            items = {"params": ocp.args.StandardRestore(abstract_state["params"])}
            if not params_only:
                items["opt_state"] = ocp.args.StandardRestore(abstract_state["opt_state"])
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as err:  # orbax/tensorstore raise many kinds for damaged files
                log.error("checkpoint step %d at %s is unreadable (%s); trying the previous one",
                          step, self.directory, one_line_reason(err))
                self.unreadable[step] = one_line_reason(err)
                continue
            state = {"params": restored["params"]}
            if not params_only:
                state["opt_state"] = restored["opt_state"]
            return step, state
        return None

    def read_json(self, step: int, name: str) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def one_line_reason(err: BaseException) -> str:
    """``Type: first line of the message`` (orbax wraps some errors around bound-method reprs)."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    cause = err.__cause__ or err.__context__
    if (not text or "<bound method" in text) and cause is not None:
        return one_line_reason(cause)
    return f"{type(err).__name__}: {text[:200]}"

"""What the exported runtime uses in place of the training package's path layer and config
errors: the export folder is local (or a Hub cache), so paths are plain ``pathlib`` paths.
``bundle.py`` maps ``vist2_jax.storage`` and ``vist2_jax.config.schema`` imports here when it
copies the runtime into an export folder; the project itself never imports this module."""

from __future__ import annotations

import os
from pathlib import Path


class ConfigError(ValueError):
    """A configuration error (the training package's ``ConfigError`` in the export folder)."""


class storage:  # noqa: N801 -- stands in for the module ``vist2_jax.storage``
    """The three calls of ``vist2_jax.storage`` the runtime makes, for local paths."""

    @staticmethod
    def as_path(path) -> Path:
        return Path(os.fspath(path)).expanduser()

    @staticmethod
    def absolute(path) -> Path:
        return storage.as_path(path).absolute()

    @staticmethod
    def local_copy(path) -> str:
        return os.fspath(path)

"""Errors a command reports as one line on stderr with exit code 2."""


class UsageError(Exception):
    """Bad command-line input (a missing file, a malformed token list)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe the user's input, config or data, each in one line: every command
    reports them as ``vist2 CMD: error: ...`` with exit code 2, never as a traceback."""
    from data_pipelines.fonts import FontError
    from data_pipelines.render import RenderRejected
    from data_pipelines.records import BadInput
    from data_pipelines.tokenizer import TokenizerError
    from vist2_jax.config.schema import ConfigError
    from vist2_jax.storage import StorageFull, StorageUnavailable

    return (ConfigError, UsageError, TokenizerError, BadInput, RenderRejected, FontError, FileNotFoundError,
            NotADirectoryError, StorageFull, StorageUnavailable)

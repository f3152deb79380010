"""The package's error types: every bad input is reported with one of these, early and by name.

Each type also derives from the built-in exception a caller would already catch
(``ValueError``, ``FileNotFoundError``, ``OSError``), so ``except ValueError`` keeps working.
Every message names the input (a file path, a dict key such as ``images['t1n']``, a config
key such as ``train.learning_rate`` or a CLI flag such as ``--weights``), says what is wrong
and, where there is one, what to do instead. See ``docs/ERRORS.md`` for examples.

    python -c "from unibrain_hf.errors import UniBrainError; help(UniBrainError)"
"""

from __future__ import annotations


class UniBrainError(Exception):
    """Base of every error this package raises on purpose (catch this to catch them all)."""


class InvalidInputError(UniBrainError, ValueError):
    """An argument value is unusable: wrong type, shape, dtype, range or combination."""


class EvaluationInputError(InvalidInputError):
    """A cohort, split or modality list that cannot be evaluated (the message says what is available)."""


class ConfigError(UniBrainError, ValueError):
    """A configuration (model ``config.json``, training YAML, CLI flags) has a missing or invalid value."""


class InputFileNotFoundError(UniBrainError, FileNotFoundError):
    """A file or directory the caller named does not exist."""


class CorruptFileError(UniBrainError, OSError, ValueError):
    """A file exists but cannot be read as what it claims to be (truncated, damaged, wrong format)."""


class ConversionError(InvalidInputError):
    """A checkpoint directory cannot be converted (bad configs, tokenizer, tensors or options).

    ``option`` names the argument of ``convert_bagel_checkpoint`` that resolves it (``overwrite``,
    ``weights``), if one does, so that ``unibrain convert`` can name its flag instead.
    """

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class UnsafeFileError(UniBrainError, ValueError):
    """A file format that can execute code when read (pickle: ``.bin``, ``.pt``, ``.ckpt``) was refused."""


class OutputExistsError(UniBrainError, FileExistsError):
    """An output location already holds something and replacing it was not asked for.

    ``path`` is the output location; a command line can name its own flag (``--overwrite``)
    instead of the Python argument named in the message (``overwrite=True``).
    """

    def __init__(self, path, what: str = "output", option: str = "overwrite=True"):
        self.path, self.what, self.option = path, what, option
        super().__init__(f"{what} {path} already exists and is not empty; pass {option} to replace it")

    def __reduce__(self):  # keep the arguments through pickling (multiprocessing workers)
        return type(self), (self.path, self.what, self.option)


class CheckpointError(UniBrainError, ValueError):
    """A training checkpoint cannot be resumed: missing, damaged, or written by another configuration or layout."""


__all__ = ["UniBrainError", "InvalidInputError", "EvaluationInputError", "ConfigError", "InputFileNotFoundError",
           "CorruptFileError", "UnsafeFileError", "OutputExistsError", "CheckpointError", "ConversionError"]

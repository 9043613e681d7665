"""Errors that speak the caller's language.

The library names its configuration fields (`d_model`, `max_len`, ...); the command
line calls them flags (`--width`, `--context`, ...). An `Error` keeps the fields it
mentions apart from its text, so `str(e)` names fields and `e.render(name)` names
them any other way: the CLI renders through one table of flags (`cli.FLAGS`)
instead of rewriting message strings.
"""

from __future__ import annotations

import re
from typing import Any, Callable


def field_name(field: str, value: Any) -> str:
    """The library's spelling of a mention: `field=value`.

    Example:
        >>> field_name("d_model", 30)
        'd_model=30'
    """
    return f"{field}={value!r}"


class Error(ValueError):
    """A message with placeholders `{name}` for the fields it mentions.

    Example:
        >>> e = Error("{x} must be divisible by {h}", x=("d_model", 30), h=("n_heads", 4))
        >>> str(e)
        'd_model=30 must be divisible by n_heads=4'
        >>> e.render(lambda field, value: f"--{field} {value}")
        '--d_model 30 must be divisible by --n_heads 4'
    """

    def __init__(self, template: str, **mentions: tuple[str, Any]):
        super().__init__(template)
        self.template = template
        self.mentions = mentions

    def render(self, name: Callable[[str, Any], str] = field_name) -> str:
        """The message with every `{placeholder}` replaced by name(field, value);
        braces that are not placeholders (in a path, say) are left alone."""
        def replace(match: re.Match) -> str:
            key = match.group(1)
            return name(*self.mentions[key]) if key in self.mentions else match.group(0)
        return re.sub(r"\{(\w+)\}", replace, self.template)

    def __str__(self) -> str:
        return self.render()


class ConfigError(Error):
    """A configuration value is invalid; the message says which and what would be valid."""


class DataError(Error):
    """The training data cannot be used; the message says why and what to do."""


class CheckpointError(Error):
    """A checkpoint is missing, corrupt, truncated, tampered with or does not match its config."""


class RunDirError(Error):
    """A run directory cannot be used as asked (it holds another run, is locked, is not writable)."""


class MemoryBudgetError(Error):
    """What was asked for would need more memory than the machine has."""


class HFError(Error):
    """A folder is not a Hugging Face model minitx can import, or a run cannot be exported as one."""


class RunFailed(Error):
    """The run itself failed (a non-finite loss, a full disk, a lost peer); what was
    saved before is kept, and the message says which checkpoint and what to try."""


class StorageError(OSError):
    """Writing a run's files failed (a full or read-only disk, a permission): which file, and why."""

    def __init__(self, path: str, error: OSError):
        super().__init__(error.errno, f"cannot write {path!r}: {error.strerror or error}")
        self.path = path

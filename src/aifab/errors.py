"""Errors a user can act on.

Every expected failure raises an `AifabError` subclass whose message is one line naming the problem
(the file, key or value at fault). The CLI prints that line and exits non-zero; anything else is a bug.
"""


class AifabError(Exception):
    """Base class: the message is shown to the user as is, without a traceback."""

    exit_code = 2


class SpecError(AifabError):
    """factory.yaml is missing, malformed, or fails validation."""


class DataError(AifabError):
    """A data path is missing, unreadable or yields an empty corpus."""


class ArtifactError(AifabError):
    """An artifact key is invalid or its content is missing."""


class ArtifactCorrupt(ArtifactError):
    """An artifact's bytes no longer match its digest."""


class NotFound(AifabError):
    """A named dataset, run or model does not exist in the store."""


class StoreError(AifabError):
    """The metadata database cannot be opened or migrated."""


class ServeError(AifabError):
    """The server cannot start (occupied port, bad host) or cannot load its model."""


class TrainError(AifabError):
    """Training cannot start or run (bad config, dataset too small for the context)."""

"""Error hierarchy of the vault package.

Every error that reaches an operator says what failed, why, and what to do.
"""

from __future__ import annotations


class VaultError(Exception):
    """Base class for all vault errors."""


class StoreError(VaultError):
    """A blob store operation failed."""


class NotFoundError(StoreError):
    """The named object does not exist."""


class TransientStoreError(StoreError):
    """The operation may succeed if retried (timeouts, throttling, 5xx)."""


class PermanentStoreError(StoreError):
    """Retrying will not help (permissions, bad names, invalid requests)."""


class IntegrityError(VaultError):
    """An object failed authentication or its content does not match its identity.

    Raised for tampering, truncation, swapped objects and wrong keys alike:
    data that does not authenticate is never returned.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(
            f"vault object {name!r} failed verification: {reason}. "
            "The object is corrupt or was tampered with (or the key is wrong); no data from "
            "it was used. Restore another recovery point, or replicate again."
        )
        self.object_name = name
        self.reason = reason


class MissingObjectError(IntegrityError):
    """An object that another, authenticated object references is not in the store."""


class UnindexedBlocksError(IntegrityError):
    """A point needs blocks that no index object lists.

    The point's manifest and maps authenticated: what is wrong is the index (an index
    object missing or damaged, or a crash before a pack was indexed), and the packs may
    still hold the blocks. The message says so, and how to repair it, instead of blaming
    the manifest. Exit code 3, as every ``IntegrityError``.
    """

    def __init__(self, point: str, disk: str, missing: int, first: int) -> None:
        VaultError.__init__(
            self,
            f"{point} cannot be restored: {missing} block(s) of disk {disk!r} (first: block "
            f"{first}) are in no index object. The point's manifest and maps are intact; an "
            "index object is missing or damaged. Run 'siterecovery check' to see which, then "
            "'siterecovery rebuild-index' to index the packs again from their trailers.")
        self.object_name = point
        self.reason = (f"{missing} block(s) of disk {disk!r} are in no index (first: block "
                       f"{first}); 'siterecovery rebuild-index' may recover them")
        self.disk, self.missing, self.first = disk, missing, first


class WrongKeyError(VaultError):
    """No key slot of the vault opens with the key material given."""


class FormatError(VaultError):
    """An object is structurally invalid or of an unsupported format version."""


class PointSelectionError(VaultError):
    """No recovery point, or more than one, answers a point spec (vault/select.py)."""


class NoSuchPointError(PointSelectionError):
    """No recovery point matches the spec; the message names the spec and what exists."""


class AmbiguousPointError(PointSelectionError):
    """Several points match an id prefix, or a ``latest*`` spec met the points of several
    machines (``machines`` names them then; empty otherwise)."""

    def __init__(self, message: str, *, machines: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.machines = machines

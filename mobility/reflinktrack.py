"""The reflink extent diff: what changed in a disk image between two cycles' clones.

With ``snapshot = "reflink"`` each cycle reads a clone of the image. This tracker
keeps that clone past the cycle under a name of its own (``.<image>.srtrack-<cycle>``,
next to the image: a hard link to the snapshot's clone, or a clone of what was read if
it was not one; it shares every extent, so it costs only the space of what is written
afterwards) and compares the extent maps (FIEMAP) of the last acknowledged cycle's
clone and the new snapshot: where both map a byte to the same physical location
with the same flags it is unchanged — the kept clone pins those extents, so the
image's writes can only go elsewhere (copy on write). Everything else is read:
extents FIEMAP cannot vouch for (inline, not yet placed, unknown flags) are read, and
Btrfs's compressed extents count as unchanged only where both clones map the very same
extent (``mobility.fiemap`` says why). Works on XFS (``reflink=1``) and Btrfs, with or
without compression; on other filesystems the clone fails and every cycle scans.

Crash safety comes from the names: the base of a cycle is the clone named after the
agent's last acknowledged cycle (``state.json``), so a crash at any moment leaves
either that clone (still exact) or none (then a full scan). Clones of cycles that
were never acknowledged are deleted by the next cycle. Anything unexpected — no
clone, another size, a filesystem without FIEMAP, the image read live — is a
``Rescan``.
"""

from __future__ import annotations

import os

import structlog

from mobility.changes import Answer, Changed, Rescan
from mobility.fiemap import FiemapError, block_ranges, differing, file_extents
from mobility.snapshot import is_clone_of, reflink_clone

log = structlog.get_logger("mobility.tracker")


class ReflinkTracker:
    """The extent diff of the image at ``image`` (see the module docstring)."""

    kind = "reflink"

    def __init__(self, image: str) -> None:
        self.image = image
        folder, name = os.path.split(os.path.abspath(image))
        self.folder, self.prefix = folder, f".{name}.srtrack-"

    def kept(self, cycle: str) -> str:
        """Where the clone of what ``cycle`` read is kept."""
        return os.path.join(self.folder, self.prefix + cycle)

    def changes(self, base: str | None, cycle: str, path: str, size: int,
                block_size: int) -> Answer:
        if os.path.samefile(path, self.image):
            self._prune(keep=set())
            return Rescan("the image is read live, not from a reflink clone")
        new = self.kept(cycle)
        self._prune(keep={new} | ({self.kept(base)} if base else set()))
        try:
            if os.path.lexists(new):
                os.unlink(new)
            if is_clone_of(path, self.image):
                # The snapshot is a clone nobody writes: keeping it is a second name for
                # it (the snapshot lets go of its own name after the cycle), not a second
                # clone — a clone costs the kernel a walk of every extent of the image.
                os.link(path, new)
            else:
                reflink_clone(path, new)
        except OSError as e:
            # Without it the next cycle has nothing to compare with: a scan, then.
            log.warning("tracker_clone_failed", image=self.image, error=e.strerror,
                        hint="the next cycle reads the whole image")
            return Rescan(f"cannot keep a clone of this cycle: {e.strerror}")
        if base is None:
            return Rescan("no acknowledged cycle to compare with")
        old = self.kept(base)
        try:
            if os.stat(old).st_size != size:
                return Rescan("the previous cycle's clone has another size")
            diff = differing(file_extents(old, size), file_extents(path, size), size)
        except FileNotFoundError:
            return Rescan("the previous cycle's clone is gone")
        except FiemapError as e:
            return Rescan(str(e))
        return Changed(tuple(block_ranges(diff, block_size)))

    def close(self) -> None:
        pass  # the kept clone stays: the next agent goes on from it

    def _prune(self, keep: set[str]) -> None:
        """Delete the kept clones of cycles other than ``keep``'s (never acknowledged,
        or superseded)."""
        for entry in os.scandir(self.folder):
            if entry.name.startswith(self.prefix) and entry.path not in keep:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass

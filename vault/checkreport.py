"""The findings of ``siterecovery check``: problems by object, and the report."""

from __future__ import annotations

from dataclasses import dataclass, field

WARNING_KINDS = frozenset({"unindexed", "stray", "unlocked"})


@dataclass(frozen=True)
class Problem:
    object: str  # the store name of the object at fault
    kind: str  # damaged, missing, truncated, mismatch, unrestorable, wrong-key; warnings
    reason: str

    @property
    def severity(self) -> str:
        return "warning" if self.kind in WARNING_KINDS else "error"

    def to_json(self) -> dict[str, str]:
        return {"object": self.object, "kind": self.kind, "reason": self.reason,
                "severity": self.severity}


@dataclass
class CheckReport:
    problems: list[Problem] = field(default_factory=list)
    wrong_key: bool = False  # no key slot opens with the key given: nothing else was checked
    read_data: bool = False
    subset: float | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("key_slots", "index_objects", "packs", "trailers_read", "blocks", "maps", "points",
         "packs_read",
         "blocks_read", "bytes_read", "digests_verified", "digests_skipped"), 0))

    def add(self, obj: str, kind: str, reason: str) -> None:
        p = Problem(obj, kind, reason)
        if p not in self.problems:
            self.problems.append(p)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def to_json(self) -> dict[str, object]:
        return {"ok": not self.errors and not self.wrong_key, "wrong_key": self.wrong_key,
                "read_data": self.read_data, "subset_percent": self.subset,
                "counts": self.counts, "errors": len(self.errors),
                "warnings": len(self.warnings),
                "problems": [p.to_json() for p in self.problems]}

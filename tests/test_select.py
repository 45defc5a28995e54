"""Point selection (vault/select.py): the one rule for ``latest``, ``latest-*-consistent``,
a point id or its unique prefix, and a moment to look back from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from vault.errors import AmbiguousPointError, NoSuchPointError, PointSelectionError, VaultError
from vault.point import Point
from vault.select import LATEST, LATEST_APP, LATEST_CRASH, select_point

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def _pt(pid: str, minute: int, consistency: str, machine: str = "vm1") -> Point:
    created = (T0 + timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return Point(id=pid, machine=machine, created=created, consistency=consistency,
                 cycle=f"c-{pid}", base=None, chain=0)


# One machine, oldest first: inconsistent initial copy, then crash, app, crash.
POINTS = [_pt("aa01", 0, "inconsistent"), _pt("bb02", 10, "crash"), _pt("bc03", 20, "app"),
          _pt("cc04", 30, "crash")]


def test_latest_kinds() -> None:
    assert select_point(POINTS, LATEST).id == "cc04"
    assert select_point(POINTS, LATEST_APP).id == "bc03"
    assert select_point(POINTS, LATEST_CRASH).id == "cc04"
    # An app-consistent point is crash-consistent too.
    assert select_point(POINTS[:3], LATEST_CRASH).id == "bc03"


def test_the_order_given_does_not_matter() -> None:
    shuffled = [POINTS[2], POINTS[0], POINTS[3], POINTS[1]]
    assert select_point(shuffled, LATEST).id == "cc04"
    assert select_point(shuffled, LATEST_APP).id == "bc03"
    assert [p.id for p in shuffled] == ["bc03", "aa01", "cc04", "bb02"]  # left as it was


def test_an_id_or_a_unique_prefix() -> None:
    assert select_point(POINTS, "bb02").id == "bb02"
    assert select_point(POINTS, "a").id == "aa01"
    assert select_point(POINTS, "bc").id == "bc03"
    with pytest.raises(AmbiguousPointError, match="'b' is ambiguous: 2 points") as e:
        select_point(POINTS, "b")
    assert e.value.machines == ()


def test_an_exact_id_wins_over_a_longer_one_it_prefixes() -> None:
    pts = [_pt("ab", 0, "crash"), _pt("abc", 1, "crash")]
    assert select_point(pts, "ab").id == "ab"


def test_nothing_matching_names_what_was_asked_and_what_exists() -> None:
    with pytest.raises(NoSuchPointError) as e:
        select_point(POINTS, "zz")
    msg = str(e.value)
    assert msg.startswith("no recovery point matches 'zz'; there are 4 ")
    assert "1 app, 2 crash, 1 inconsistent" in msg and "the newest cc04 of 2026-11-25T12:30" in msg
    with pytest.raises(NoSuchPointError, match="matches 'latest-app-consistent'; there is 1 "
                                               r"\(1 inconsistent\)"):
        select_point(POINTS[:1], LATEST_APP)
    with pytest.raises(NoSuchPointError, match="no recovery point matches 'latest' for machine "
                                               "'vm9'; there is no recovery point to choose"):
        select_point(POINTS, LATEST, machine="vm9")
    with pytest.raises(NoSuchPointError, match="no recovery point to choose from"):
        select_point([], LATEST)
    # Domain errors of the vault: the CLI maps them to its exit codes.
    assert issubclass(NoSuchPointError, PointSelectionError)
    assert issubclass(PointSelectionError, VaultError)


def test_latest_needs_one_machine() -> None:
    pts = [*POINTS, _pt("dd05", 40, "app", machine="db1")]
    with pytest.raises(AmbiguousPointError, match=r"several \(db1, vm1\)") as e:
        select_point(pts, LATEST)
    assert e.value.machines == ("db1", "vm1")
    with pytest.raises(AmbiguousPointError):
        select_point(pts, LATEST_APP)
    assert select_point(pts, LATEST, machine="vm1").id == "cc04"
    assert select_point(pts, LATEST_APP, machine="db1").id == "dd05"
    # An id names one point whatever the machines; with a machine, only its points count.
    assert select_point(pts, "dd").id == "dd05"
    with pytest.raises(NoSuchPointError, match="'dd' for machine 'vm1'"):
        select_point(pts, "dd", machine="vm1")


def test_at_looks_back_from_a_moment() -> None:
    at = T0 + timedelta(minutes=25)
    assert select_point(POINTS, LATEST, at=at).id == "bc03"
    assert select_point(POINTS, LATEST, at=T0 + timedelta(minutes=20)).id == "bc03"  # at: kept
    assert select_point(POINTS, LATEST_APP, at=at).id == "bc03"
    assert select_point(POINTS, LATEST_CRASH, at=T0 + timedelta(minutes=15)).id == "bb02"
    # A later machine's points do not make 'latest' ambiguous once 'at' leaves them out.
    pts = [*POINTS, _pt("dd05", 40, "app", machine="db1")]
    assert select_point(pts, LATEST, at=at).id == "bc03"
    with pytest.raises(NoSuchPointError, match="at or before 2026-11-25T12:05:00"):
        select_point(POINTS, LATEST_APP, at=T0 + timedelta(minutes=5))
    with pytest.raises(NoSuchPointError, match="no recovery point to choose from"):
        select_point(POINTS, LATEST, at=T0 - timedelta(seconds=1))
    with pytest.raises(NoSuchPointError):
        select_point(POINTS, "cc04", at=at)  # the point exists, but after 'at'
    with pytest.raises(ValueError, match="aware"):
        select_point(POINTS, LATEST, at=datetime(2026, 11, 25, 12, 25))

"""The support matrix: which machines the Mobility agent can protect.

Linux only for now; Windows is refused with a clear "not supported yet". A
distribution is named as in ``/etc/os-release`` (``ID`` and ``VERSION_ID``);
a few common spellings are accepted and stored as the canonical ``ID``. When a
kernel release (``uname -r``) is given it must be at least the kernel the
release shipped with — anything older is a typo or a machine we never tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Release:
    version: str  # "22.04", "12", "9": the VERSION_ID the release is known by
    min_kernel: tuple[int, int]  # the kernel it shipped with (uname -r, major.minor)


@dataclass(frozen=True)
class Distribution:
    os_name: str  # /etc/os-release ID
    display: str
    aliases: tuple[str, ...]
    releases: tuple[Release, ...]
    version_parts: int  # how many leading parts of VERSION_ID name the release (22.04 → 2)


def _r(version: str, kernel: str) -> Release:
    major, minor = kernel.split(".")
    return Release(version, (int(major), int(minor)))


_RHEL = (_r("8", "4.18"), _r("9", "5.14"))
DISTRIBUTIONS: tuple[Distribution, ...] = (
    Distribution("ubuntu", "Ubuntu", ("ubuntu", "ubuntu-server", "ubuntu-lts"),
                 (_r("20.04", "5.4"), _r("22.04", "5.15"), _r("24.04", "6.8")), 2),
    Distribution("debian", "Debian", ("debian", "debian-gnu-linux"),
                 (_r("11", "5.10"), _r("12", "6.1"), _r("13", "6.12")), 1),
    Distribution("rhel", "Red Hat Enterprise Linux",
                 ("rhel", "redhat", "red-hat", "red-hat-enterprise-linux"), _RHEL, 1),
    Distribution("rocky", "Rocky Linux", ("rocky", "rocky-linux", "rockylinux"), _RHEL, 1),
    Distribution("almalinux", "AlmaLinux", ("almalinux", "alma", "alma-linux"), _RHEL, 1),
    Distribution("centos", "CentOS Stream",
                 ("centos", "centos-stream", "centosstream"), _RHEL, 1),
    Distribution("ol", "Oracle Linux",
                 ("ol", "oracle", "oracle-linux", "oraclelinux"), _RHEL, 1),
)
WINDOWS_NOTE = ("Windows machines are not supported yet: the Mobility agent runs on Linux "
                "only")
_VERSION = re.compile(r"^[0-9]{1,4}(\.[0-9]{1,4}){0,3}$")
_KERNEL = re.compile(r"^([0-9]{1,3})\.([0-9]{1,3})(\.[0-9]{1,5})?([-+~._A-Za-z0-9]{0,56})$")


class Unsupported(Exception):
    """The machine is outside the support matrix; ``str(e)`` says why."""


class BadKernel(ValueError):
    """The kernel string is not a Linux kernel release."""


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def summary() -> str:
    """One line naming everything supported, for error hints."""
    parts = [f"{d.display} ({d.os_name}) {', '.join(r.version for r in d.releases)}"
             for d in DISTRIBUTIONS]
    return ("supported: " + "; ".join(parts) + "; Windows: not supported yet. "
            "Full matrix with minimum kernels: GET /api/v1/support-matrix or "
            "'siterecovery machine support-matrix'")


def matrix() -> dict[str, Any]:
    """The matrix as the API returns it."""
    return {
        "os_types": [
            {"os_type": "linux", "supported": True, "note": "the distributions below"},
            {"os_type": "windows", "supported": False, "note": WINDOWS_NOTE},
        ],
        "distributions": [
            {"os_name": d.os_name, "display_name": d.display, "aliases": list(d.aliases),
             "versions": [{"os_version": r.version,
                           "min_kernel": f"{r.min_kernel[0]}.{r.min_kernel[1]}"}
                          for r in d.releases]}
            for d in DISTRIBUTIONS],
    }


def parse_kernel(kernel: str) -> tuple[int, int]:
    m = _KERNEL.fullmatch(kernel)
    if not m:
        raise BadKernel(f"kernel {kernel!r} is not a Linux kernel release (as 'uname -r' "
                        "prints it, e.g. 5.15.0-91-generic)")
    return int(m.group(1)), int(m.group(2))


def check(os_type: str, os_name: str | None, os_version: str | None,
          kernel: str | None) -> tuple[str, str]:
    """Check a machine against the matrix; return its canonical (os_name, os_version).

    Raises ``Unsupported`` (outside the matrix) or ``BadKernel`` (unparseable).
    """
    if os_type == "windows":
        raise Unsupported(WINDOWS_NOTE)
    if os_type != "linux":
        raise Unsupported(f"os_type {os_type!r} is not supported; use 'linux'")
    if not os_name or not os_version:
        raise Unsupported("a Linux machine needs os_name and os_version (ID and VERSION_ID "
                          "from its /etc/os-release, e.g. ubuntu and 22.04)")
    key = _key(os_name)
    dist = next((d for d in DISTRIBUTIONS if key in d.aliases), None)
    if dist is None:
        raise Unsupported(f"distribution {os_name!r} is not supported")
    version = os_version.strip()
    if not _VERSION.fullmatch(version):
        raise Unsupported(f"{dist.display} version {os_version!r} is not a version number "
                          "(VERSION_ID from /etc/os-release, e.g. "
                          f"{dist.releases[-1].version})")
    release_id = ".".join(version.split(".")[:dist.version_parts])
    release = next((r for r in dist.releases if r.version == release_id), None)
    if release is None:
        raise Unsupported(f"{dist.display} {version} is not supported (supported: "
                          f"{', '.join(r.version for r in dist.releases)})")
    if kernel:
        have = parse_kernel(kernel)
        if have < release.min_kernel:
            need = f"{release.min_kernel[0]}.{release.min_kernel[1]}"
            raise Unsupported(f"kernel {kernel} is older than {dist.display} "
                              f"{release.version}'s {need}; supported kernels for it are "
                              f"{need} and newer")
    return dist.os_name, version


def _at_least(n: int, width: int) -> str:
    """A regex for strings of exactly ``width`` digits (leading zeros allowed) whose value
    is at least ``n`` (which has at most ``width`` digits)."""
    digits = str(n).zfill(width)
    assert len(digits) == width, (n, width)
    alts, prefix = [], ""
    for i, d in enumerate(digits):
        rest = width - i - 1
        if d != "9":
            alts.append(f"{prefix}[{int(d) + 1}-9][0-9]{{{rest}}}")
        prefix += d
    alts.append(prefix)
    return "(?:" + "|".join(alts) + ")"


def _kernel_at_least(major: int, minor: int) -> str:
    """A pattern for the ``uname -r`` strings ``parse_kernel`` reads as at least
    ``major.minor`` (up to 3 digits each, as it reads them; leading zeros count as it
    counts them: by value)."""
    def widths(n: int, among: tuple[int, ...] = (1, 2, 3)) -> str:  # value >= n
        return "(?:" + "|".join(_at_least(n, w) for w in among if n < 10 ** w) + ")"

    tail = "(\\.[0-9]{1,5})?[-+~._A-Za-z0-9]{0,56}$"
    # the minor is the first (up to) 3 digits after the dot: a shorter one ends the run
    short_tail = "(\\.[0-9]{1,5})?([-+~._A-Za-z][-+~._A-Za-z0-9]{0,55})?$"
    minor_ok = f"(?:{_at_least(minor, 3)}{tail}"
    if minor < 100:
        minor_ok += f"|{widths(minor, (1, 2))}{short_tail}"
    minor_ok += ")"
    any_minor = f"(?:[0-9]{{3}}{tail}|[0-9]{{1,2}}{short_tail})"
    return f"^(?:{widths(major + 1)}\\.{any_minor}|{widths(major)}\\.{minor_ok})"


def request_rules() -> dict[str, Any]:
    """The matrix as JSON schema for a machine's ``os_type``, ``os_name``, ``os_version``
    and ``kernel`` (what ``check`` accepts; spellings are given in lower case, which
    ``check`` does not require). Windows is refused."""
    releases = []
    for d in DISTRIBUTIONS:
        for r in d.releases:
            head = r.version.replace(".", "\\.")
            more = 4 - d.version_parts
            releases.append({"properties": {
                "os_name": {"enum": list(d.aliases)},
                "os_version": {"pattern": f"^\\s*{head}(\\.[0-9]{{1,4}}){{0,{more}}}\\s*$"},
                "kernel": {"anyOf": [{"type": "null"}, {"const": ""},
                                     {"pattern": _kernel_at_least(*r.min_kernel)}]}}})
    return {"properties": {"os_type": {"const": "linux"}},
            "required": ["os_name", "os_version"], "anyOf": releases}

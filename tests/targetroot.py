"""A minimal Debian 12 tree for the push-install target, built from Debian packages and
cached.

``target_root()`` returns the directory of a merged-/usr root file system holding
``PACKAGES`` and their dependencies (each ``Depends``/``Pre-Depends`` group resolved to
its first alternative, a virtual package to its first provider, read with ``apt-cache
depends``): what the agent bundle needs on a machine (Debian's python3.11, the CPython
minor version the bundle is built with), what the install script and the prerequisite
checks run (a POSIX shell, coreutils, sed, tar, cmp, pgrep, ``hostname -I``, df, sudo
with PAM), and losetup/setsid for the tests. The packages are fetched with ``apt-get
download`` from apt's configured sources and unpacked with ``dpkg-deb`` (no maintainer
scripts run: what they would make that the tree needs is written here, e.g. sudo's PAM
configuration and the dynamic linker's cache, made with ``ldconfig -r``).

Built once per package list under ``.cache/targetroot/<digest of VERSION and
PACKAGES>/tree`` (a changed list builds a new tree); the cached tree is shared and must
never be written: tests/sshd.py mounts it as the lower layer of an overlay. Needs root
(the packages' owners and set-uid bits, chroot), ``apt-get``, ``apt-cache``, ``dpkg-deb``,
``tar`` and ``ldconfig``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.helpers import REPO

VERSION = "1"
CACHE = REPO / ".cache" / "targetroot"
PACKAGES = ("base-files", "base-passwd", "dash", "bash", "coreutils", "sed", "grep",
            "mawk", "tar", "gzip", "diffutils", "findutils", "procps", "hostname",
            "util-linux", "usr-is-merged", "sudo", "libpam-modules", "python3.11-minimal",
            "libpython3.11-stdlib")
TOOLS = ("apt-get", "apt-cache", "dpkg-deb", "tar", "ldconfig", "chroot")
MARKER = "etc/siterecovery-test-target"  # in the tree: "this is the target's root"
MERGED = ("bin", "sbin", "lib", "lib64")  # merged /usr, as Debian 12 installs it

PAM_SUDO = """# written by tests/targetroot.py (pam-auth-update does not run in the tree)
auth     required pam_unix.so
account  required pam_unix.so
session  required pam_permit.so
"""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def key(packages: tuple[str, ...] = PACKAGES) -> str:
    """The cache's name for the tree of ``packages`` (and this ``VERSION``)."""
    return hashlib.sha256("\n".join((VERSION, *sorted(packages))).encode()).hexdigest()[:16]


def target_root(packages: tuple[str, ...] = PACKAGES) -> Path:
    """The cached tree of ``packages``, building it first if this package list has
    none."""
    done = CACHE / key(packages) / "tree"
    if (done / MARKER).exists():
        return done
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=".build-") as tmp:
        tree = _build(Path(tmp), packages)
        done.parent.mkdir(exist_ok=True)
        try:
            os.rename(tree, done)  # atomic: a concurrent builder's tree is as good as ours
        except OSError:
            if not (done / MARKER).exists():
                raise
    return done


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    res = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: exit {res.returncode}\n"
                           f"{res.stdout}{res.stderr}")
    return res.stdout


def choices(text: str, prefer: set[str]) -> set[str]:
    """The packages ``apt-cache depends`` output asks for: of each group of alternatives
    (a virtual package standing for its providers) one in ``prefer`` if any, else the
    first."""
    wanted: set[str] = set()
    group: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        kind, sep, name = line.strip().lstrip("|").partition(": ")
        if not sep or kind not in ("Depends", "PreDepends"):
            continue
        if name.startswith("<"):  # virtual: its providers are the next, deeper lines
            for p in lines[i + 1:]:
                if not p.startswith("    "):
                    break
                group.append(p.strip())
        else:
            group.append(name)
        if line.startswith(" |"):
            continue  # the group goes on
        names = [g.split(":")[0] for g in group]
        if names:
            wanted.add(next((n for n in names if n in prefer), names[0]))
        group = []
    return wanted


def closure(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """``packages`` and every package they need, sorted."""
    seen: set[str] = set()
    todo = set(packages)
    while todo:
        seen |= todo
        out = run("apt-cache", "depends", "--no-recommends", "--no-suggests",
                   "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
                   *sorted(todo))
        todo = choices(out, set(packages)) - seen
    return sorted(seen)


def _build(work: Path, packages: tuple[str, ...]) -> Path:
    debs, tree = work / "debs", work / "tree"
    debs.mkdir()
    tree.mkdir(mode=0o755)
    names = closure(packages)
    try:
        run("apt-get", "download", "-q", *names, cwd=debs)
    except RuntimeError:  # package lists missing or stale (a new machine): refresh, once
        run("apt-get", "update", "-qq")
        run("apt-get", "download", "-q", *names, cwd=debs)
    for d in MERGED:
        (tree / "usr" / d).mkdir(parents=True, exist_ok=True)
        (tree / d).symlink_to(f"usr/{d}")
    for deb in sorted(debs.glob("*.deb")):
        data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                              capture_output=True).stdout
        subprocess.run(["tar", "-x", "-p", "--same-owner", "--keep-directory-symlink",
                        "-C", str(tree)], input=data, check=True, capture_output=True)
    _finish(tree, packages)
    return tree


def _finish(tree: Path, packages: tuple[str, ...]) -> None:
    """What the packages' maintainer scripts would have made that the target uses."""
    for d in ("proc", "sys", "dev", "run", "tmp", "var/tmp", "root", "home/alice",
              "var/lib"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "tmp").chmod(0o1777)
    (tree / "var/tmp").chmod(0o1777)
    (tree / "root").chmod(0o700)
    os.chown(tree / "home/alice", 1500, 1500)  # the user tests/sshd.py gives the machine
    (tree / "etc/nsswitch.conf").write_text("passwd: files\ngroup: files\nshadow: files\n"
                                            "hosts: files\n")
    if not (tree / "bin/sh").exists():
        (tree / "usr/bin/sh").symlink_to("dash")
    if not (tree / "usr/bin/python3").exists():
        (tree / "usr/bin/python3").symlink_to("python3.11")
    if not (tree / "usr/bin/awk").exists():
        (tree / "usr/bin/awk").symlink_to("mawk")
    (tree / "etc/pam.d").mkdir(parents=True, exist_ok=True)
    (tree / "etc/pam.d/sudo").write_text(PAM_SUDO)
    (tree / "etc/pam.d/other").write_text(PAM_SUDO)
    for f in ("passwd", "group", "shadow", "hosts", "sudoers", "hostname"):
        (tree / "etc" / f).touch()  # bind-mount points: each test's own
    (tree / "etc/shadow").chmod(0o600)
    run("ldconfig", "-r", tree)
    # the byte code of the standard library, as python3.11's postinst (py3compile) makes it
    run("chroot", tree, "/usr/bin/python3.11", "-m", "compileall", "-q",
         "/usr/lib/python3.11")
    (tree / MARKER).write_text(f"siterecovery test target root {key(packages)}\n")

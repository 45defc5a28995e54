#!/usr/bin/env bash
# Install everything the test suite needs, then run it all: lint, types, tests.
# Usage: bash tests/run.sh [pytest args...]   (CI runs exactly this via .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# System packages: qemu-img (VHD checks), e2fsprogs (ext4 on loop devices), openssh-server
# and sudo (push install), postgresql (scale-out catalog), systemd (systemd-analyze
# verify), restic, faketime (libfaketime: registration's clock-skew check with a real
# offset), xfsprogs (reflink snapshots of disk images on a real XFS), btrfs-progs
# (mkfs.btrfs: the reflink and block-layer trackers on a real Btrfs, with and without
# compression), libvirt + QEMU + dnsmasq (the libvirt failover target: emulated VMs boot
# the test disk that tests/bootdisk.py builds from Debian packages fetched with apt-get
# download), fdisk (sfdisk: partitioned test disks), testssl.sh (the suites the TLS
# listeners offer), dosfstools (mkfs.vfat: EFI system partitions of the images whose boot
# mode the Azure target reads), prometheus (promtool: deploy/prometheus/ rules checked and
# unit tested; no daemon is started or needed).
need=()
for pair in qemu-img:qemu-utils mkfs.ext4:e2fsprogs sshd:openssh-server sudo:sudo \
            pg_ctlcluster:postgresql-common systemd-analyze:systemd faketime:faketime \
            mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs virsh:libvirt-clients libvirtd:libvirt-daemon-system \
            qemu-system-x86_64:qemu-system-x86 dnsmasq:dnsmasq-base sfdisk:fdisk \
            testssl:testssl.sh mkfs.vfat:dosfstools promtool:prometheus \
            chromium:chromium chromedriver:chromium-driver nbdinfo:libnbd-bin; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
[ -d /usr/lib/postgresql ] || need+=(postgresql)
if ((${#need[@]})); then
  echo "tests/run.sh: installing ${need[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Azurite (Azure Blob emulator) pinned: 3.37 needs Node 22.
if [ ! -x "$ROOT/.cache/azurite/node_modules/.bin/azurite-blob" ]; then
  echo "tests/run.sh: installing azurite@3.35.0"
  mkdir -p "$ROOT/.cache/azurite"
  npm install --silent --no-audit --no-fund --prefix "$ROOT/.cache/azurite" azurite@3.35.0 >/dev/null
fi
export SITERECOVERY_AZURITE="$ROOT/.cache/azurite/node_modules/.bin/azurite-blob"

# axe-core pinned: the web console's accessibility check runs it inside the real browser.
if [ ! -f "$ROOT/.cache/axe/node_modules/axe-core/axe.min.js" ]; then
  echo "tests/run.sh: installing axe-core@4.10.3"
  mkdir -p "$ROOT/.cache/axe"
  npm install --silent --no-audit --no-fund --prefix "$ROOT/.cache/axe" axe-core@4.10.3 >/dev/null
fi
export SITERECOVERY_AXE="$ROOT/.cache/axe/node_modules/axe-core/axe.min.js"

# Python environment.
if [ ! -x .venv/bin/python ]; then
  if ! python3 -m venv .venv 2>/dev/null; then
    rm -rf .venv
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 \
  | grep -v -e '^WARNING: Location' -e '^ *$' || true

echo "tests/run.sh: ruff"
.venv/bin/ruff check .
echo "tests/run.sh: mypy"
.venv/bin/mypy common wire vault targets instant configserver procserver mobility siterecovery tests benchmarks
echo "tests/run.sh: pytest"
set +e
# Two workers by default, a module at a time (tests/conftest.py keeps the modules on the
# machine's libvirtd, VMs and sshd address on one worker): about 20 instead of 35 minutes
# on two cores. SITERECOVERY_TEST_WORKERS=0 runs everything in this one process.
.venv/bin/python -m pytest -p no:cacheprovider -n "${SITERECOVERY_TEST_WORKERS:-2}" \
  --dist loadscope "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "tests/run.sh: pytest collected no tests — that is a failure" >&2
  exit 1
fi
exit "$rc"

#!/bin/sh
# Install the siterecovery Mobility agent from its bundle (run from the unpacked bundle):
#
#   ./install.sh [--root DIR] [--python PATH] [--start]
#
# Checks first, changes nothing unless they pass: an interpreter that can run the
# bundle's vendored wheels (MANIFEST.json "target": CPython version, architecture)
# and every file's sha256. Then installs into the prefix the bundle was built for
# (MANIFEST.json "prefix", /opt/siterecovery-agent by default) and the systemd unit
# siterecovery-agent.service, enabled; --start also starts it (it needs
# /etc/siterecovery/mobility.toml). Re-running the same version changes nothing; another
# version replaces the program files and keeps the agent's state
# (/var/lib/siterecovery-mobility) and config. Everything installed is listed in
# PREFIX/INSTALLED, which uninstall.sh removes.
#
# --root DIR installs into the tree DIR (as a package build would) and never calls
# systemctl. Exit codes: 0 installed (or already), 2 usage, 3 refused (the message says
# why and what to do), 1 failed.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=""
python=""
start=0
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=${2:?--root wants a directory}; shift 2 ;;
        --python) python=${2:?--python wants an interpreter}; shift 2 ;;
        --start) start=1; shift ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# The check runs in each candidate interpreter: version and architecture against the
# manifest, then every file's sha256. Prints the reason when it refuses.
check='
import hashlib, json, os, platform, sys
here = sys.argv[1]
m = json.load(open(os.path.join(here, "MANIFEST.json")))
t = m["target"]
v = "%d.%d" % sys.version_info[:2]
if sys.implementation.name != t["implementation"]:
    sys.exit("it is %s, the bundle needs %s" % (sys.implementation.name, t["implementation"]))
if t["python_exact"] and v != t["python"]:
    sys.exit("it is Python %s, the bundle needs %s exactly (its compiled wheels)" % (v, t["python"]))
if not t["python_exact"] and sys.version_info[:2] < (3, 11):
    sys.exit("it is Python %s, the agent needs 3.11 or later" % v)
if platform.machine() != t["machine"]:
    sys.exit("this machine is %s, the bundle was built for %s" % (platform.machine(), t["machine"]))
for name, digest in m["files"].items():
    with open(os.path.join(here, name), "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != digest:
            sys.exit("the bundle is damaged: %s does not match MANIFEST.json; copy it again" % name)
print(m["prefix"])
print(m["agent_version"])
'
want=$(sed -n 's/^ *"python": "\(.*\)",$/\1/p' "$here/MANIFEST.json" | head -n 1)
if [ -n "$python" ]; then
    candidates=$python
else
    candidates="python$want python3"
fi
reasons=""
chosen=""
for c in $candidates; do
    p=$(command -v "$c" 2>/dev/null) || { reasons="$reasons
  $c: not found"; continue; }
    if out=$("$p" -I -S -c "$check" "$here" 2>&1); then
        chosen=$p
        break
    fi
    reasons="$reasons
  $p: $out"
done
if [ -z "$chosen" ]; then
    echo "install.sh: refused: no interpreter here can run this agent bundle:$reasons" >&2
    echo "hint: install CPython $want (e.g. 'apt-get install python$want' or 'dnf install python$want'), or build the bundle on this distribution ('siterecovery agent bundle')" >&2
    exit 3
fi
prefix=$(echo "$out" | sed -n 1p)
version=$(echo "$out" | sed -n 2p)
dest="$root$prefix"
unitdir="$root/etc/systemd/system"
unit="$unitdir/siterecovery-agent.service"

if [ -f "$dest/MANIFEST.json" ] && cmp -s "$dest/MANIFEST.json" "$here/MANIFEST.json" \
        && [ -f "$unit" ] && cmp -s "$unit" "$here/siterecovery-agent.service"; then
    echo "siterecovery agent $version is already installed in $prefix"
    exit 0
fi

# The new tree next to the old one, swapped in by rename: a failed copy leaves the
# installed agent as it was.
rm -rf "$dest.new"
mkdir -p "$dest.new"
cp -R "$here/lib" "$here/vendor" "$here/bin" "$here/agent.py" "$here/MANIFEST.json" \
    "$here/uninstall.sh" "$dest.new/"
echo "$chosen" > "$dest.new/python"
printf '%s\n' "$prefix" "/etc/systemd/system/siterecovery-agent.service" > "$dest.new/INSTALLED"
if [ -d "$dest" ]; then
    mv "$dest" "$dest.old"
fi
mv "$dest.new" "$dest"
rm -rf "$dest.old"
mkdir -p "$unitdir"
cp "$here/siterecovery-agent.service" "$unit.tmp"
mv "$unit.tmp" "$unit"
echo "installed siterecovery agent $version in $prefix (Python: $chosen)"

if [ -n "$root" ]; then
    echo "installed into the tree $root: enable siterecovery-agent.service where it runs"
elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    systemctl enable siterecovery-agent.service
    if [ "$start" = 1 ]; then
        systemctl restart siterecovery-agent.service
    fi
else
    echo "this machine does not run systemd: start the agent with" \
         "'$prefix/bin/siterecovery-agent run --config /etc/siterecovery/mobility.toml'" \
         "from its init system"
    if [ "$start" = 1 ]; then
        exit 3
    fi
fi

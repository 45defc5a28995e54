#!/bin/sh
# Remove the siterecovery Mobility agent installed from its bundle:
#
#   PREFIX/uninstall.sh [--root DIR]
#
# Stops and disables siterecovery-agent.service (unless --root), then removes every path
# PREFIX/INSTALLED lists (the program files, the unit, and what a push install added:
# the agent's config, certificates and state), last the prefix itself.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=""
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=${2:?--root wants a directory}; shift 2 ;;
        -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "uninstall.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now siterecovery-agent.service 2>/dev/null || true
fi
list=$(cat "$here/INSTALLED")
# Last listed first: what was added after the install goes before the prefix.
for path in $(echo "$list" | sed '1!G;h;$!d'); do
    case "$path" in
        /*) rm -rf "$root$path" ;;
        *) echo "uninstall.sh: skipping $path (not absolute)" >&2 ;;
    esac
done
if [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
fi
echo "siterecovery agent removed"

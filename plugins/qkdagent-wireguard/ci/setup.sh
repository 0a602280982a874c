#!/bin/sh
# One-time setup for the kernel WireGuard test: fetch the current Debian kernel package and keep
# only vmlinuz and the modules the QEMU guest needs, under .cache/kernel (git-ignored).
# Idempotent: does nothing when the cache is complete. Run as root after `pip install -e`.
set -eu
plugin=$(cd "$(dirname "$0")/.." && pwd)
cache="$plugin/.cache/kernel"
python=${PYTHON:-$(command -v python || command -v python3)}
if [ -f "$cache/vmlinuz" ] && [ -f "$cache/modules/order" ]; then
    echo "qkdagent-wireguard: kernel cache ready ($(cat "$cache/release"))"
    exit 0
fi
find_package() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
package=$(find_package)
if [ -z "$package" ]; then
    apt-get update -qq
    package=$(find_package)
fi
[ -n "$package" ] || { echo "qkdagent-wireguard: no linux-image-amd64 in apt" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download "$package" >/dev/null 2>&1 || { apt-get update -qq && apt-get download "$package"; }
dpkg-deb -x ./*.deb unpacked
mkdir -p "$plugin/.cache"
"$python" "$plugin/tests/wg_guestvm.py" extract unpacked "$cache"

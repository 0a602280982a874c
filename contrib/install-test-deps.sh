#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian 12 machine (run as root):
# the real consumers the plugins are tested against (wireguard-go, strongSwan, stunnel,
# SoftHSM2, QEMU for the kernel WireGuard test), then qkdagent and every plugin in editable mode.
# Each plugin may add Debian packages in plugins/<name>/ci/apt.txt and one-time setup in
# plugins/<name>/ci/setup.sh (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  wireguard-go wireguard-tools iproute2 iputils-ping
  strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-standard-plugins
  stunnel4 openssl softhsm2 nghttp2-proxy gnutls-bin
  qemu-system-x86 busybox-static
)
for extra in plugins/*/ci/apt.txt; do
  [ -f "$extra" ] && mapfile -t -O "${#packages[@]}" packages < <(grep -v '^\s*\(#\|$\)' "$extra")
done
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
else
  echo "not root: skipping Debian packages (${packages[*]})" >&2
fi

# Debian's own python3 is "externally managed" (PEP 668) and may lack pip; a pyenv or
# python.org build is not. Either way the packages go where `python3 -m pytest` finds them.
if ! python3 -m pip --version >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
fi
export PIP_BREAK_SYSTEM_PACKAGES=1
editable=(-e ".[test]")
for plugin in plugins/*/; do
  [ -f "$plugin/pyproject.toml" ] && editable+=(-e "$plugin")
done
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "${editable[@]}"

for setup in plugins/*/ci/setup.sh; do
  if [ -x "$setup" ]; then
    echo "running $setup"
    "$setup"
  fi
done

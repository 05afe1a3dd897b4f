#!/usr/bin/env bash
# System packages some tests use: iproute2 (network namespaces), systemd (systemd-analyze
# verify on the units in deploy/), haproxy, nftables,
# chromium and chromium-driver (the dashboard test), docker-compose (its config check
# of deploy/compose.yaml; no container daemon is needed for that), stunnel4 (the stunnel
# pair, SV1 over TLS as a farm would wrap it, that bench transport compares with). Idempotent; run as root.
# Without root or apt it says so and exits 0: the tests that need these skip with a reason.
set -euo pipefail

PACKAGES=(iproute2 systemd haproxy nftables chromium chromium-driver docker-compose stunnel4)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-system: not root; skipping system packages (${PACKAGES[*]}). Tests that need them will skip."
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-system: apt-get not found; install ${PACKAGES[*]} with your package manager. Tests that need them will skip."
    exit 0
fi

missing=()
for package in "${PACKAGES[@]}"; do
    if dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        echo "setup-system: $package already installed"
    else
        missing+=("$package")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "setup-system: all system packages present"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log="$(mktemp -t setup-system.XXXXXX.log)"
echo "setup-system: apt-get update"
if ! apt-get update -q >"$log" 2>&1; then
    echo "setup-system: apt-get update failed (no network?); see $log. Tests that need ${missing[*]} will skip."
    exit 0
fi
echo "setup-system: installing ${missing[*]}"
if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
    echo "setup-system: apt-get install failed; see $log. Tests that need ${missing[*]} will skip."
    exit 0
fi
echo "setup-system: installed ${missing[*]}"
rm -f "$log"

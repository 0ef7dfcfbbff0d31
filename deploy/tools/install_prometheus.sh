#!/usr/bin/env bash
# Install Prometheus and promtool from Debian's `prometheus` package, without starting its system service;
# idempotent.
#
# Usage: deploy/tools/install_prometheus.sh     -> prints the directory holding `prometheus` and `promtool`
# The alert unit tests (promtool test rules) and the real-Prometheus integration test start their own
# Prometheus with their own config and data dir on loopback: the Debian service would only take port 9090
# and scrape nothing of ours, so a policy-rc.d keeps it from starting during the install, and it is left
# stopped. Override the lookup with POPBRIDGE_PROMETHEUS_DIR (a directory with both binaries).
set -euo pipefail

dir="${POPBRIDGE_PROMETHEUS_DIR:-/usr/bin}"
if [[ -x "$dir/prometheus" && -x "$dir/promtool" ]]; then
    echo "$dir"
    exit 0
fi

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
policy=/usr/sbin/policy-rc.d
placed_policy=""
if [[ ! -e "$policy" ]]; then
    # invoke-rc.d asks this script whether to start a service; 101 means "no".
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    placed_policy=1
fi
cleanup() { if [[ -n "$placed_policy" ]]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT

echo "install_prometheus.sh: installing Debian's prometheus package (service not started)" >&2
$SUDO apt-get update -q >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends prometheus >&2
# On a machine with systemd the unit may still be enabled for the next boot: disable it (harmless elsewhere).
if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
    $SUDO systemctl disable --now prometheus >&2 || true
fi

for tool in prometheus promtool; do
    if [[ ! -x "/usr/bin/$tool" ]]; then
        echo "install_prometheus.sh: /usr/bin/$tool missing after the install" >&2
        exit 1
    fi
done
echo /usr/bin

#!/usr/bin/env bash
# Real peers some tests drive, from Debian: chromium (the status page in a browser) and
# prometheus (promtool checks /metrics, the dashboard's queries and the scrape config).
# Installed where this can (root and apt-get); elsewhere those tests fail and say what to install.
# FMA_SYSTEM_DEPS=skip leaves the machine alone.
set -uo pipefail
[ "${FMA_SYSTEM_DEPS:-}" = skip ] && exit 0
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "==> not installing ${need[*]} (needs root and apt-get): the browser and promtool tests will fail until they are installed"
  exit 0
fi
echo "==> installing ${need[*]} with apt-get (for the browser and promtool tests)"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }; then
  echo "==> apt-get could not install ${need[*]}: the browser and promtool tests will fail"
fi
exit 0

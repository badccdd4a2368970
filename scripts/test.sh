#!/usr/bin/env bash
# Runs every test. Installs the system tools the tests drive and starts Redis when
# they are missing, so that it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

# Debian packages: Chromium for the docs-page test (never a downloaded browser),
# docker-compose for `docker-compose config` (needs no engine) and nginx for the
# stack test's load balancer. No recommends: docker-compose would pull in docker.io.
browser=()
[ -x /usr/bin/chromium ] || browser+=(chromium)
packages=()
command -v docker-compose >/dev/null 2>&1 || packages+=(docker-compose)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || packages+=(nginx-light)
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
if [ "$((${#browser[@]} + ${#packages[@]}))" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${browser[*]} ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    if [ "${#browser[@]}" -gt 0 ]; then
      apt-get install -y -q "${browser[@]}" >/dev/null
    fi
    if [ "${#packages[@]}" -gt 0 ]; then
      apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null
    fi
  else
    echo "missing ${browser[*]} ${packages[*]} and cannot install them:" \
      "those tests fail in CI, skip elsewhere"
  fi
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  if command -v redis-server >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  else
    echo "redis-server is not available: the Redis tests skip (and fail in CI) saying why"
  fi
fi
exec "$BIN/python" -m pytest "$@"

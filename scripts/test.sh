#!/usr/bin/env bash
# Runs every test. Starts the services the tests need when they are not running.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  if command -v redis-server >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  else
    echo "redis-server is not installed: the Redis tests will skip and say why"
  fi
fi
# The docs-page test drives Debian's Chromium (never a downloaded browser).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q chromium >/dev/null
  else
    echo "/usr/bin/chromium is absent and this is not root: the browser test fails in CI, skips elsewhere"
  fi
fi
# The stack test checks docker-compose.yml with a real compose (`docker-compose
# config` needs no engine) and runs deploy/nginx.conf with Debian's nginx.
# No recommends: docker-compose would pull in the docker.io engine.
stack_tools=()
command -v docker-compose >/dev/null 2>&1 || stack_tools+=(docker-compose)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || stack_tools+=(nginx-light)
if [ "${#stack_tools[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${stack_tools[@]}" >/dev/null
  else
    echo "docker-compose or nginx is absent and this is not root: the stack tests fail in CI, skip elsewhere"
  fi
fi
exec "$BIN/python" -m pytest "$@"

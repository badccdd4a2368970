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
exec "$BIN/python" -m pytest "$@"

#!/usr/bin/env bash
# Make sure PostgreSQL (127.0.0.1:5432, db `test`) and Redis (127.0.0.1:6379) answer; start them if not.
set -uo pipefail
pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
if ! pg_up && command -v pg_ctlcluster >/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 30); do pg_up && break; sleep 1; done
fi
if ! redis_up && command -v redis-server >/dev/null; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
  for _ in $(seq 30); do redis_up && break; sleep 1; done
fi
pg_up && echo "postgres: up" || echo "postgres: NOT reachable (tests marked postgres will skip)"
redis_up && echo "redis: up" || echo "redis: NOT reachable (tests marked redis will skip)"
# The browser tests (report.html, /docs) use Debian's chromium: install it once where apt can.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "chromium: installing Debian's package for the browser tests (once)"
  timeout 300 apt-get install -y -q chromium >/dev/null 2>&1 \
    || { timeout 120 apt-get update -q >/dev/null 2>&1 && timeout 300 apt-get install -y -q chromium >/dev/null 2>&1; } || true
fi
command -v chromium >/dev/null && echo "chromium: $(command -v chromium)" || echo "chromium: missing (browser tests will skip)"

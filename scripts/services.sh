#!/usr/bin/env bash
# Makes sure RabbitMQ and PostgreSQL are installed, running and answering on 127.0.0.1.
# Used by .ci/run and by scripts/run (the README's run command). Idempotent.
#   scripts/services.sh           install if missing (needs root + apt-get), start, wait
#   scripts/services.sh --check   only report; exit 1 if a service is not answering
set -euo pipefail

check_only=false
[ "${1:-}" = "--check" ] && check_only=true

log() { printf '[services] %s\n' "$*" >&2; }

rabbit_up() { rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1 || rabbitmqctl -q status >/dev/null 2>&1; }
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1; }

wait_for() { # name, command, seconds
  local name=$1 cmd=$2 secs=$3 i
  for ((i = 0; i < secs * 2; i++)); do
    if $cmd; then log "$name is answering"; return 0; fi
    sleep 0.5
  done
  log "$name did not answer within ${secs}s"; return 1
}

install_missing() {
  local pkgs=()
  command -v rabbitmqctl >/dev/null 2>&1 || pkgs+=(rabbitmq-server)
  command -v pg_ctlcluster >/dev/null 2>&1 || pkgs+=(postgresql)
  [ ${#pkgs[@]} -eq 0 ] && return 0
  if $check_only; then log "not installed: ${pkgs[*]}"; return 1; fi
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "missing ${pkgs[*]} and cannot install them here (needs root and apt-get)."
    log "Install RabbitMQ >= 3.10 and PostgreSQL >= 15, or run: docker compose up -d rabbitmq postgres"
    return 1
  fi
  log "installing ${pkgs[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${pkgs[@]}" >/dev/null
}

# Tools only tests need, none of them a service of loginconnect: PgBouncer
# (tests/tests/pgbouncer.rs starts its own in front of PostgreSQL to prove the pooler rule),
# promtool (Debian's `prometheus` package) for the alert rules' unit tests (.ci/run,
# tests/tests/monitoring.rs), and Debian's chromium with its chromedriver (package
# chromium-driver) for the web console's browser tests (tests/tests/console.rs). Installed
# here when root and apt-get can; otherwise a warning only (running loginconnect needs none of
# them; the test that does then fails, naming it).
install_test_tools() {
  local pkgs=()
  command -v pgbouncer >/dev/null 2>&1 || pkgs+=(pgbouncer)
  command -v promtool >/dev/null 2>&1 || pkgs+=(prometheus)
  [ -x /usr/bin/chromium ] || pkgs+=(chromium)
  [ -x /usr/bin/chromedriver ] || pkgs+=(chromium-driver)
  [ ${#pkgs[@]} -eq 0 ] && return 0
  $check_only && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "not installed: ${pkgs[*]} (only tests need them: pgbouncer for tests/tests/pgbouncer.rs, prometheus for promtool, chromium and chromium-driver for tests/tests/console.rs): apt-get install ${pkgs[*]}"
    return 0
  fi
  log "installing ${pkgs[*]} (test tools: the pooler test, promtool, the browser tests)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${pkgs[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "${pkgs[@]}" >/dev/null; }
  # Debian's package starts a Prometheus server of its own; only promtool is wanted here.
  if [[ " ${pkgs[*]} " == *" prometheus "* ]]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || true
  fi
}

start_rabbit() {
  rabbit_up && return 0
  $check_only && { log "RabbitMQ is not running"; return 1; }
  log "starting RabbitMQ"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_for RabbitMQ rabbit_up 90
}

start_pg() {
  if ! pg_up; then
    $check_only && { log "PostgreSQL is not running"; return 1; }
    log "starting PostgreSQL"
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
    wait_for PostgreSQL pg_up 60
  fi
  # The tests and the default DATABASE_URL use trust auth for user postgres over TCP.
  if ! psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; then
    log "PostgreSQL answers, but user 'postgres' cannot log in over TCP without a password."
    log "Allow it (trust for 127.0.0.1 in pg_hba.conf) or set DATABASE_URL/TEST_POSTGRES_BASE with credentials."
    return 1
  fi
}

install_missing
install_test_tools
start_rabbit
start_pg

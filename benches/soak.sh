#!/usr/bin/env bash
# The fault-injection soak (tests/soak.rs) for as long as you like, with the flags the issue asks
# for. `cargo test` takes no flags of its own, so this maps them onto the test's environment.
#
#   bash benches/soak.sh                          # seed 42, 2 minutes (what CI runs)
#   bash benches/soak.sh --seed 7 --duration 30m  # a long run by hand
#
# --seed N        the fault schedule's seed (same seed, same schedule)
# --duration D    how long to inject faults: seconds, or with a unit (90s, 30m, 2h)
#
# Needs root: it creates network namespaces (198.18.0.0/15 underlay, 100.64.0.0/10 tunnel),
# runs the real gateway and two clients in them and removes everything at the end. The summary
# table (faults by kind, recoveries, p50/p99/max time to recover, leaks, RSS, log lines) is
# printed at the end; the run fails if any assertion does.
set -euo pipefail
cd "$(dirname "$0")/.."

seed=42 duration=120
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) seed=${2:?--seed needs a value}; shift 2 ;;
    --duration) duration=${2:?--duration needs a value}; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "soak.sh: unknown argument '$1'" >&2; usage 2 ;;
  esac
done
case "$seed" in ''|*[!0-9]*) echo "soak.sh: --seed must be a non-negative integer, not '$seed'" >&2; exit 2 ;; esac
case "$duration" in
  *[0-9]h) secs=$(( ${duration%h} * 3600 )) ;;
  *[0-9]m) secs=$(( ${duration%m} * 60 )) ;;
  *[0-9]s) secs=${duration%s} ;;
  *) secs=$duration ;;
esac
case "$secs" in ''|*[!0-9]*) echo "soak.sh: --duration must look like 120, 90s, 30m or 2h, not '$duration'" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "soak.sh: needs root (network namespaces)" >&2; exit 2; }

echo "soak: seed $seed, $secs s" >&2
HOLDFAST_SOAK_SEED=$seed HOLDFAST_SOAK_SECS=$secs \
  exec cargo test --release --locked --test soak -- --nocapture

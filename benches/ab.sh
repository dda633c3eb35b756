#!/usr/bin/env bash
# A/B of two Holdfast set-ups by their ping: both tunnels up at once, each in its own pair of
# namespaces, plain pings alternating between them in BLOCKS blocks; prints both medians and B/A.
# For a change whose effect on a round trip is a few percent: a tunnel's median drifts more than that
# within minutes on a shared machine, and alternating cancels the drift (as hops.sh does against
# boringtun). A set-up is a build and a client file:
#
#   bash benches/ab.sh                                   # A/A: the current build against itself
#   BIN_B=/tmp/other/holdfast bash benches/ab.sh         # another build as B (its holdfast-client beside it)
#   KIND_B=nokill bash benches/ab.sh                     # B without the kill-switch
#   KIND_B=split ENV_B=HOLDFAST_SHED=off bash benches/ab.sh
#
# PIN=1 runs both gateways on CPU 0 and both clients and the pings on CPU 1 (`taskset`), as if
# each gateway were on another machine: then no thread of the gateway ever shares a CPU with the
# client side, and only the client's own scheduling is compared.
#
# UPLOADS=N (default 0): then N rounds of iperf3 uploads through each tunnel to its gateway's tunnel
# address, SECS_UP seconds each (default 4), one side after the other and the order swapped every
# round; prints each side's Gbit/s, its median and B/A. DOWN=1 makes them downloads (iperf3 -R). For a change meant for the ping that could
# cost throughput: where the threads happen to run when a transfer starts decides much of an
# upload's speed on a 2-vCPU machine, and alternating puts both sides under the same conditions.
#
# KIND_A / KIND_B: default (the file `gateway add-client` writes: full tunnel, kill-switch on),
# nokill (the same, kill-switch off) or split (split tunnel, no kill-switch). ENV_A / ENV_B: one
# NAME=VALUE for both processes of that side. PINGS (default 400, in all per side), BLOCKS
# (default 20), INTERVAL (default 0.02 s).
#
# Needs root. Namespaces on 198.18.0.0/15, tunnels in 100.64.0.0/10 and fd00::/8; everything is
# removed on exit or failure, every process runs under `timeout`, nothing touches the machine's own
# namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/provision.sh

case ${1:-} in -h|--help) sed -n '2,/^set -e/{/^set -e/d; s/^# \{0,1\}//; p}' "$0"; exit 0 ;; "") ;;
  *) echo "ab.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;; esac
PINGS=${PINGS:-400} BLOCKS=${BLOCKS:-20} INTERVAL=${INTERVAL:-0.02}
[[ $PINGS =~ ^[0-9]+$ ]] && [ "$PINGS" -ge 10 ] && [ "$PINGS" -le 4000 ] \
  || { echo "ab.sh: PINGS must be 10 to 4000, not '$PINGS'" >&2; exit 2; }
[[ $BLOCKS =~ ^[0-9]+$ ]] && [ "$BLOCKS" -ge 1 ] && [ "$BLOCKS" -le "$PINGS" ] \
  || { echo "ab.sh: BLOCKS must be 1 to PINGS ($PINGS), not '$BLOCKS'" >&2; exit 2; }
[[ $INTERVAL =~ ^0\.[0-9]+$|^[1-9]$ ]] || { echo "ab.sh: INTERVAL must be seconds like 0.02, not '$INTERVAL'" >&2; exit 2; }
for kind in "${KIND_A:=default}" "${KIND_B:=default}"; do
  case $kind in default|nokill|split) ;; *) echo "ab.sh: KIND_A / KIND_B must be default, nokill or split, not '$kind'" >&2; exit 2 ;; esac
done
UPLOADS=${UPLOADS:-0} SECS_UP=${SECS_UP:-4} DOWN=${DOWN:-0}
case $DOWN in 0) REV=() WHAT=uploads ;; 1) REV=(-R) WHAT=downloads ;; *) echo "ab.sh: DOWN must be 0 or 1, not '$DOWN'" >&2; exit 2 ;; esac
[[ $UPLOADS =~ ^[0-9]+$ ]] && [ "$UPLOADS" -le 50 ] || { echo "ab.sh: UPLOADS must be 0 to 50, not '$UPLOADS'" >&2; exit 2; }
[[ $SECS_UP =~ ^[0-9]+$ ]] && [ "$SECS_UP" -ge 1 ] && [ "$SECS_UP" -le 30 ] \
  || { echo "ab.sh: SECS_UP must be 1 to 30, not '$SECS_UP'" >&2; exit 2; }
for e in "${ENV_A:-}" "${ENV_B:-}"; do
  [ -z "$e" ] || [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || { echo "ab.sh: ENV_A / ENV_B must be NAME=VALUE, not '$e'" >&2; exit 2; }
done
need ping iputils-ping; need nft nftables; need python3 python3
[ "$UPLOADS" = 0 ] || need iperf3 iperf3
bench_pin ab.sh

TAG=hfab$$
UA=198.18.0.1 UB=198.18.0.2 PORT=51820
WORK=$(mktemp -d /tmp/holdfast-ab.XXXX)
LIFE=$((PINGS * 2 + 300 + UPLOADS * 2 * (SECS_UP + 15)))
PIDS=()
cleanup() { bench_cleanup ${TAG}a ${TAG}b ${TAG}c ${TAG}d; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# One side: SIDE CLIENT-NS GATEWAY-NS VETH-A VETH-B BIN KIND ENV
up() {
  local side=$1 na=$2 nb=$3 va=$4 vb=$5 bin kind=$7 env=${8:-HOLDFAST_AB_SIDE=$1}
  bin=$(readlink -f "$6") || bin=$6
  [ -x "$bin" ] && [ -x "$(dirname "$bin")/holdfast-client" ] \
    || { echo "ab.sh: side $side: no holdfast and holdfast-client at $(dirname "$bin")" >&2; exit 2; }
  bench_pair_netns "$na" "$nb" "$va" "$vb" $UA $UB
  mkdir -p "$WORK/$side"
  provision_gateway "$bin" "$WORK/$side" $UB:$PORT
  provision_client "$bin" "$WORK/$side" default "$([ "$kind" = split ] && echo split || echo default)"
  if [ "$kind" = nokill ]; then
    python3 - "$WORK/$side/default.toml" <<'PY'
import sys
path = sys.argv[1]; text = open(path).read(); head = '[network]\n'
text = text.replace(head, head + 'killswitch = false\n', 1) if head in text else text + '\n' + head + 'killswitch = false\n'
open(path, 'w').write(text)
PY
  fi
  bench_launch "gw-$side" "${GW_CPU[@]}" env "$env" ip netns exec "$nb" "$bin" gateway run --dir "$WORK/$side/gw"
  bench_launch "client-$side" "${CL_CPU[@]}" env "$env" ip netns exec "$na" "$(dirname "$bin")/holdfast-client" run --no-tui --config "$WORK/$side/default.toml"
  for _ in $(seq 100); do ip netns exec "$na" ping -q -c 1 -W 1 100.64.0.1 >/dev/null 2>&1 && break; sleep 0.1; done
  ip netns exec "$na" ping -q -c 1 -W 2 100.64.0.1 >/dev/null \
    || { echo "ab.sh: side $side: the tunnel did not come up"; tail -5 "$WORK/client-$side.log" "$WORK/gw-$side.log"; exit 1; }
  ip netns exec "$na" ping -q -n -c 20 -i 0.02 100.64.0.1 >/dev/null   # past the first packets' set-up
}

bench_header "holdfast A/B ping  pings=$PINGS blocks=$BLOCKS interval=${INTERVAL}s pin=$PIN"
bench_binary
up A ${TAG}a ${TAG}b ${TAG}va ${TAG}vb "${BIN_A:-$BIN}" "$KIND_A" "${ENV_A:-}"
up B ${TAG}c ${TAG}d ${TAG}vc ${TAG}vd "${BIN_B:-$BIN}" "$KIND_B" "${ENV_B:-}"
echo "# A: $(readlink -f "${BIN_A:-$BIN}") $KIND_A ${ENV_A:-}"
echo "# B: $(readlink -f "${BIN_B:-$BIN}") $KIND_B ${ENV_B:-}"

rtts() { # NS COUNT: the RTTs of COUNT plain pings from NS, in ms, one per line
  "${CL_CPU[@]}" ip netns exec "$1" ping -n -c "$2" -i "$INTERVAL" -W 1 100.64.0.1 2>/dev/null | grep -o 'time=[0-9.]*' | cut -d= -f2
}
: >"$WORK/a.rtt"; : >"$WORK/b.rtt"
for _ in $(seq "$BLOCKS"); do
  rtts ${TAG}a $((PINGS / BLOCKS)) >>"$WORK/a.rtt"
  rtts ${TAG}c $((PINGS / BLOCKS)) >>"$WORK/b.rtt"
done
python3 - "$WORK/a.rtt" "$WORK/b.rtt" <<'PY'
import statistics, sys
a = [float(x) for x in open(sys.argv[1]).read().split()]
b = [float(x) for x in open(sys.argv[2]).read().split()]
if not a or not b:
    print('no replies on one side'); sys.exit(1)
ma, mb = statistics.median(a), statistics.median(b)
print('alternating (%d / %d pings): A median %.3f ms, B median %.3f ms, B/A %.3f' % (len(a), len(b), ma, mb, mb / ma))
PY

[ "$UPLOADS" = 0 ] && exit 0
transfer() { # CLIENT-NS GATEWAY-NS: one upload's (DOWN=1: download's) Gbit/s as received (0 when iperf3 failed)
  local sp json
  timeout $((SECS_UP + 15)) ip netns exec "$2" iperf3 -s -1 -B 100.64.0.1 >/dev/null 2>&1 & sp=$!
  for _ in $(seq 50); do ip netns exec "$2" ss -ltn | grep -q ":5201 " && break; sleep 0.1; done
  json=$(timeout $((SECS_UP + 10)) "${CL_CPU[@]}" ip netns exec "$1" iperf3 -c 100.64.0.1 -t "$SECS_UP" -J "${REV[@]}") || true
  wait "$sp" 2>/dev/null || true
  python3 -c 'import json, sys
try: print("%.2f" % (json.loads(sys.stdin.read())["end"]["sum_received"]["bits_per_second"] / 1e9))
except Exception: print("0")' <<<"$json"
}
: >"$WORK/a.up"; : >"$WORK/b.up"
for i in $(seq "$UPLOADS"); do
  if [ $((i % 2)) = 1 ]; then
    transfer ${TAG}a ${TAG}b >>"$WORK/a.up"; transfer ${TAG}c ${TAG}d >>"$WORK/b.up"
  else
    transfer ${TAG}c ${TAG}d >>"$WORK/b.up"; transfer ${TAG}a ${TAG}b >>"$WORK/a.up"
  fi
done
python3 - "$WORK/a.up" "$WORK/b.up" "$WHAT" <<'PY'
import statistics, sys
a = [float(x) for x in open(sys.argv[1]).read().split()]
b = [float(x) for x in open(sys.argv[2]).read().split()]
what = sys.argv[3]
fmt = lambda v: ' '.join('%.2f' % x for x in v)
print('%s A Gbit/s: %s' % (what, fmt(a)))
print('%s B Gbit/s: %s' % (what, fmt(b)))
ma, mb = statistics.median(a), statistics.median(b)
print('alternating %s (%d / %d): A median %.2f Gbit/s, B median %.2f, B/A %.3f' % (what, len(a), len(b), ma, mb, mb / ma if ma else 0))
PY

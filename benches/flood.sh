#!/usr/bin/env bash
# Flood benchmark: TCP through the Holdfast tunnel (both directions, iperf3 and iperf3 -R) and
# ping through it, while two other namespaces flood the gateway's link. One run measures:
#   none        no flood
#   reference   both floods aimed at a closed port of the gateway (the cost of the flood itself)
#   junk        random junk at the data port (the socket filter drops it in the kernel)
#   headers     well-formed headers with random session ids at the data port (reach user space:
#               unknown session; per-source budgets withhold the notices)
#   forged      well-formed headers naming the live session, bad tags (budgets shed the AES work)
# Goal: flooded rows at >= 90 % of the reference both ways; tunnel ping <= 1.5x the unflooded one.
# Each flooded case runs once per gateway mode (HOLDFAST_SHED, MODES): off (no filter, no budgets:
# the data plane before), filter (the socket filter only), full (filter and per-source budgets).
#
#   bash benches/flood.sh                 # SECS=10 per iperf3 run; each flood covers up, down, ping
#   SECS=5 CASES="none reference junk" MODES=full bash benches/flood.sh
#   BIN=/path/to/other/holdfast bash benches/flood.sh   # the same run with another build
#
# Needs root and python3. Creates four namespaces (client, gateway, two flooders) joined by veth
# pairs on 198.18.0.0/15 (tunnel 100.64.0.0/10), removes everything on exit, never touches the
# machine's own namespace. Each flooder is one Python process (benches/flood/sender.py), bounded
# in count and time.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/provision.sh
SECS=${SECS:-10}
FLOOD_SECS=${FLOOD_SECS:-$((2 * SECS + 15))}
CASES=${CASES:-none reference junk headers forged}
MODES=${MODES:-off filter full}
TAG=hff$$ NC=${TAG}c NG=${TAG}g NJ=${TAG}j NH=${TAG}h
GW=198.18.0.2 PORT=51820 CLOSED=51999 TUN_GW=100.64.0.1
WORK=$(mktemp -d /tmp/holdfast-flood.XXXX)
PIDS=()

need iperf3 iperf3; need ping iputils-ping; need python3 python3

stop_all() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
             for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done; PIDS=(); }
cleanup() { set +e; stop_all; kill ${GW_PID:-} ${CL_PID:-} 2>/dev/null; wait 2>/dev/null; for n in $NC $NG $NJ $NH; do ip netns del $n 2>/dev/null; done; rm -rf "$WORK"; }
trap cleanup EXIT INT TERM

# --- topology: client 198.18.0.1 -- gateway 198.18.0.2; flooders 198.18.2.2, 198.18.3.2 ------
for n in $NC $NG $NJ $NH; do ip netns add $n; ip -n $n link set lo up; done
ip -n $NC link add vc type veth peer name vgc netns $NG
ip -n $NC addr add 198.18.0.1/24 dev vc; ip -n $NG addr add $GW/24 dev vgc
ip -n $NJ link add vj type veth peer name vgj netns $NG
ip -n $NJ addr add 198.18.2.2/24 dev vj; ip -n $NG addr add 198.18.2.1/24 dev vgj
ip -n $NH link add vh type veth peer name vgh netns $NG
ip -n $NH addr add 198.18.3.2/24 dev vh; ip -n $NG addr add 198.18.3.1/24 dev vgh
for x in "$NC vc" "$NG vgc" "$NJ vj" "$NG vgj" "$NH vh" "$NG vgh"; do set -- $x; ip -n $1 link set $2 up; done
ip -n $NJ route add default via 198.18.2.1; ip -n $NH route add default via 198.18.3.1

bench_header "holdfast flood bench  secs=$SECS"
bench_binary

provision_pair "$BIN" "$WORK" $GW:$PORT
start_pair() { # HOLDFAST_SHED mode of the gateway: off (before this work), filter, full
  HOLDFAST_SHED=$1 ip netns exec $NG "$BIN" gateway run --dir "$WORK/gw" >"$WORK/gw-$1.log" 2>&1 & GW_PID=$!
  ip netns exec $NC "$BIN" client run --no-tui --config "$WORK/client.toml" >"$WORK/client-$1.log" 2>&1 & CL_PID=$!
  for _ in $(seq 100); do ip netns exec $NC ping -q -c 1 -W 1 $TUN_GW >/dev/null 2>&1 && break; sleep 0.1; done
  ip netns exec $NC ping -q -c 1 -W 2 $TUN_GW >/dev/null || { echo "tunnel did not come up"; tail -20 "$WORK/client-$1.log" "$WORK/gw-$1.log"; exit 1; }
  SID=$("$BIN" gateway status --dir "$WORK/gw" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["sessions"][0]["session_id"])')
}
stop_pair() {
  kill -TERM $CL_PID $GW_PID 2>/dev/null || true; wait $CL_PID $GW_PID 2>/dev/null || true
  for _ in $(seq 50); do ip -n $NC link show holdfast0 >/dev/null 2>&1 || break; sleep 0.1; done
}

gbps() { # extra-iperf3-args...
  timeout $((SECS+20)) ip netns exec $NG iperf3 -s -1 -B $TUN_GW >/dev/null 2>&1 & local sp=$!
  for _ in $(seq 50); do ip netns exec $NG ss -ltn | grep -q ":5201 " && break; sleep 0.1; done
  timeout $((SECS+15)) ip netns exec $NC iperf3 -c $TUN_GW -t "$SECS" -J "$@" \
    | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))' || echo 0
  wait $sp 2>/dev/null || true
}
rtt_ms() { ip netns exec $NC ping -q -c 100 -i 0.02 $TUN_GW | awk -F'[/ =]+' '/rtt/{print $7}'; }
flood() { # port: both flooders at the gateway's PORT (headers/junk) or a closed one
  local case=$1 port=$2
  case $case in
    reference) ip netns exec $NJ python3 benches/flood/sender.py junk $GW $port "$FLOOD_SECS" 100000000 >>"$WORK/flood.log" & PIDS+=($!)
               ip netns exec $NH python3 benches/flood/sender.py headers $GW $port "$FLOOD_SECS" 100000000 >>"$WORK/flood.log" & PIDS+=($!) ;;
    junk)      ip netns exec $NJ python3 benches/flood/sender.py junk $GW $port "$FLOOD_SECS" 100000000 >>"$WORK/flood.log" & PIDS+=($!)
               ip netns exec $NH python3 benches/flood/sender.py junk $GW $port "$FLOOD_SECS" 100000000 >>"$WORK/flood.log" & PIDS+=($!) ;;
    headers)   ip netns exec $NJ python3 benches/flood/sender.py headers $GW $port "$FLOOD_SECS" 100000000 >>"$WORK/flood.log" & PIDS+=($!)
               ip netns exec $NH python3 benches/flood/sender.py headers $GW $port "$FLOOD_SECS" 100000000 >>"$WORK/flood.log" & PIDS+=($!) ;;
    forged)    ip netns exec $NJ python3 benches/flood/sender.py headers $GW $port "$FLOOD_SECS" 100000000 >>"$WORK/flood.log" & PIDS+=($!)
               ip netns exec $NH python3 benches/flood/sender.py forged $GW $port "$FLOOD_SECS" 100000000 "$SID" >>"$WORK/flood.log" & PIDS+=($!) ;;
  esac
  sleep 1
}
printf '%-18s %12s %12s %10s\n' case "up Gbit/s" "down Gbit/s" "ping ms"
declare -A UP DOWN RTT
for mode in $MODES; do
  start_pair "$mode"
  for case in $CASES; do
    # The unflooded and closed-port rows do not depend on the mode: measured once.
    if [ "$case" = none ] || [ "$case" = reference ]; then [ -z "${UP[$case]:-}" ] || continue; key=$case
    else key="$case/$mode"; fi
    : >"$WORK/flood.log"
    case $case in none) ;; reference) flood reference $CLOSED ;; *) flood $case $PORT ;; esac
    # Each measurement in the same flood: iperf3 up, down, then ping.
    UP[$key]=$(gbps); DOWN[$key]=$(gbps -R); RTT[$key]=$(rtt_ms)
    stop_all
    printf '%-18s %12s %12s %10s   %s\n' "$key" "${UP[$key]}" "${DOWN[$key]}" "${RTT[$key]}" "$(tr '\n' ' ' <"$WORK/flood.log")"
  done
  echo "# gateway ($mode): $("$BIN" gateway status --dir "$WORK/gw" | grep -E 'shedding' | sed 's/^ *//')"
  stop_pair
done
ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print('%.2f' % (a/b) if b else 'n/a')" "$1" "$2"; }
if [ -n "${UP[reference]:-}" ]; then
  for key in "${!UP[@]}"; do
    case $key in none|reference) continue ;; esac
    echo "$key / reference: up $(ratio "${UP[$key]}" "${UP[reference]}") down $(ratio "${DOWN[$key]}" "${DOWN[reference]}") (goal >= 0.90)   ping / unflooded: $(ratio "${RTT[$key]}" "${RTT[none]:-0}") (goal <= 1.5)"
  done | sort
fi
echo "# flood log lines (full mode):"
grep -hE "flood (on|over)" "$WORK"/gw-full.log 2>/dev/null | tail -6 || true
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"

#!/usr/bin/env bash
# Data-plane benchmark: TCP throughput (iperf3) and ping RTT through Holdfast, through boringtun-cli
# (userspace WireGuard, the anchor we want to beat) and over the bare veth, measured in ONE run on
# this machine between two network namespaces, so the ratios compare like with like.
#
#   bash benches/throughput.sh            # RUNS=3 SECS=10 by default
#   RUNS=1 SECS=5 bash benches/throughput.sh
#   SKIP_BORINGTUN=1 bash benches/throughput.sh
#
# Needs root. Creates two namespaces joined by a veth pair on 198.18.0.0/15 (tunnel addresses in
# 100.64.0.0/10 and fd00::/8), removes everything on exit, never touches the machine's own
# namespace. The holdfast6 row is TCP over IPv6 inside the same tunnel (TSO6 reads, GSO_TCPV6
# merged writes).
# boringtun-cli is installed with `cargo install` into target/bench-tools (cached).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/provision.sh
RUNS=${RUNS:-3} SECS=${SECS:-10}
TAG=hfb$$ NA=${TAG}a NB=${TAG}b VA=${TAG}va VB=${TAG}vb
UA=198.18.0.1 UB=198.18.0.2 PORT=51820
WG_A=100.64.1.1 WG_B=100.64.1.2
GW6=fd00:b:e::1
TOOLS=$PWD/target/bench-tools
WORK=$(mktemp -d /tmp/holdfast-bench.XXXX)
PIDS=()

need() { command -v "$1" >/dev/null || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need iperf3 iperf3; need ping iputils-ping; need nft nftables
[ "${SKIP_BORINGTUN:-}" = 1 ] || need wg wireguard-tools

stop_all() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
             for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done; PIDS=(); }
cleanup() { set +e; stop_all; ip netns del $NA 2>/dev/null; ip netns del $NB 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT INT TERM

median() { sort -g | awk '{a[NR]=$1} END{ if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
gbps() { # client-ns server-ns server-ip
  timeout $((SECS+20)) ip netns exec "$2" iperf3 -s -1 -B "$3" >/dev/null 2>&1 & local sp=$!
  for _ in $(seq 50); do ip netns exec "$2" ss -ltn | grep -q ":5201 " && break; sleep 0.1; done
  timeout $((SECS+15)) ip netns exec "$1" iperf3 -c "$3" -t "$SECS" -J \
    | python3 -c 'import json,sys; print("%.3f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
  wait $sp 2>/dev/null || true
}
rtt_ms() { ip netns exec "$1" ping -q -c 50 -i 0.02 "$2" | awk -F'[/ =]+' '/rtt/{print $7}'; }
declare -A TCP RTT
measure() { # label server-ip
  local g=() p=()
  for _ in $(seq "$RUNS"); do g+=("$(gbps $NA $NB "$2")"); p+=("$(rtt_ms $NA "$2")"); done
  TCP[$1]=$(printf '%s\n' "${g[@]}" | median); RTT[$1]=$(printf '%s\n' "${p[@]}" | median)
  printf '%-12s tcp %8s Gbit/s (runs: %s)   ping %7s ms (runs: %s)\n' "$1" "${TCP[$1]}" "${g[*]}" "${RTT[$1]}" "${p[*]}"
}

# --- topology -------------------------------------------------------------------------------
ip netns add $NA; ip netns add $NB
ip link add $VA type veth peer name $VB; ip link set $VA netns $NA; ip link set $VB netns $NB
ip -n $NA addr add $UA/24 dev $VA; ip -n $NB addr add $UB/24 dev $VB
for n in $NA $NB; do ip -n $n link set lo up; done; ip -n $NA link set $VA up; ip -n $NB link set $VB up

echo "# holdfast data-plane bench $(date -u +%FT%TZ) nproc=$(nproc) runs=$RUNS secs=$SECS"
cargo build --release --quiet --bin holdfast
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/holdfast
measure veth $UB

# --- holdfast: gateway in B, client in A ----------------------------------------------------
provision_pair "$BIN" "$WORK" $UB:$PORT
ip netns exec $NB "$BIN" gateway run --dir "$WORK/gw" >"$WORK/gw.log" 2>&1 & PIDS+=($!)
ip netns exec $NA "$BIN" client run --no-tui --config "$WORK/client.toml" >"$WORK/client.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do ip netns exec $NA ping -q -c 1 -W 1 100.64.0.1 >/dev/null 2>&1 && break; sleep 0.1; done
ip netns exec $NA ping -q -c 1 -W 2 100.64.0.1 >/dev/null || { echo "holdfast tunnel did not come up"; tail -20 "$WORK/client.log" "$WORK/gw.log"; exit 1; }
measure holdfast 100.64.0.1
measure holdfast6 $GW6
stop_all

# --- boringtun-cli ----------------------------------------------------------------------------
if [ "${SKIP_BORINGTUN:-}" != 1 ]; then
  BT=$TOOLS/bin/boringtun-cli
  [ -x "$BT" ] || cargo install --quiet --locked boringtun-cli --root "$TOOLS" >&2
  mkdir -p "$WORK/run/wireguard"; chmod 700 "$WORK/run"
  # boringtun puts its control socket under /run/wireguard: give each namespace a private /run.
  nsx() { local ns=$1; shift; ip netns exec "$ns" unshare -m --propagation private sh -c 'mount --bind "$0" /run && exec "$@"' "$WORK/run" "$@"; }
  (umask 077; wg genkey >"$WORK/a.key"; wg genkey >"$WORK/b.key")
  wg pubkey <"$WORK/a.key" >"$WORK/a.pub"; wg pubkey <"$WORK/b.key" >"$WORK/b.pub"
  nsx $NA "$BT" wga --foreground --disable-drop-privileges --threads 1 --log "$WORK/bta.log" & PIDS+=($!)
  nsx $NB "$BT" wgb --foreground --disable-drop-privileges --threads 1 --log "$WORK/btb.log" & PIDS+=($!)
  for _ in $(seq 50); do [ -S "$WORK/run/wireguard/wga.sock" ] && [ -S "$WORK/run/wireguard/wgb.sock" ] && break; sleep 0.1; done
  nsx $NA wg set wga private-key "$WORK/a.key" listen-port $PORT peer "$(cat "$WORK/b.pub")" allowed-ips $WG_B/32 endpoint $UB:$PORT
  nsx $NB wg set wgb private-key "$WORK/b.key" listen-port $PORT peer "$(cat "$WORK/a.pub")" allowed-ips $WG_A/32 endpoint $UA:$PORT
  ip -n $NA addr add $WG_A/24 dev wga; ip -n $NA link set wga mtu 1420 up
  ip -n $NB addr add $WG_B/24 dev wgb; ip -n $NB link set wgb mtu 1420 up
  ip netns exec $NA ping -q -c 3 -i 0.2 -W 2 $WG_B >/dev/null
  measure boringtun $WG_B
  stop_all
fi

# --- ratios -----------------------------------------------------------------------------------
ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print('%.2f' % (a/b) if b else 'n/a')" "$1" "$2"; }
echo "holdfast/veth      tcp $(ratio "${TCP[holdfast]}" "${TCP[veth]}")"
echo "holdfast6/holdfast tcp $(ratio "${TCP[holdfast6]}" "${TCP[holdfast]}")   (TCP over IPv6 vs IPv4 inside the tunnel)"
if [ -n "${TCP[boringtun]:-}" ]; then
  echo "holdfast/boringtun tcp $(ratio "${TCP[holdfast]}" "${TCP[boringtun]}")   ping $(ratio "${RTT[holdfast]}" "${RTT[boringtun]}") (lower is better)"
fi

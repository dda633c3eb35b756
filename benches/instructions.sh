#!/usr/bin/env bash
# The user-space instructions each end of a tunnel executes per ping, and per MB of an upload:
# Holdfast (the client file as `gateway add-client` writes it: full tunnel, kill-switch on) and
# boringtun-cli (one thread), counted by valgrind's callgrind. One end at a time runs under
# callgrind while the other runs as it is, in a fresh pair of namespaces per count.
#
#   sudo bash benches/instructions.sh                  # PINGS=300 pings, one every 0.02 s
#   sudo BULK_SECS=5 bash benches/instructions.sh      # also an iperf3 upload of 5 s per end
#   sudo SKIP_BORINGTUN=1 bash benches/instructions.sh # Holdfast alone; BIN= / CLIENT_BIN= another build
#   sudo TOP=20 bash benches/instructions.sh           # functions listed per end (default 12)
#
# Why: an instruction count is the same from run to run for the same binary and input, whatever
# else the machine does, where a ping's time or a CPU-second count moves by more than most single
# changes to the per-packet code. It answers "does this change do less work per packet", not
# "is it faster": a round trip here also waits on wake-ups and cold caches, which this does not see.
#
# What is counted: every thread of the process under callgrind, from after 50 warm-up pings to the
# end of the measured ones (callgrind_control zeroes, then dumps). Per ping: that total divided by
# PINGS (the idle work of the process in those seconds included, as on a real gateway). Per MB: the
# total over the upload divided by the MB iperf3 received (1 MB = 10^6 bytes). Not counted: the
# kernel's work (the system calls, the network stack, the copies), which is most of a tunnel's
# CPU time (see the README). Under valgrind, which hides VAES and AVX-512 from CPUID, Holdfast's
# AES-GCM is ring's (the backend it chooses without AVX-512) running its AES-NI + CLMUL code, so
# Holdfast's cipher counts are of that code, not of the VAES code (ring's or AWS-LC's) it runs
# natively; boringtun's ChaCha20-Poly1305 is its AVX2 code either way.
#
# Needs root, valgrind (callgrind_control); ping, nftables, iperf3, python3 and wireguard-tools are
# installed if missing. Namespaces on 198.18.0.0/15, tunnels in 100.64.0.0/10 and fd00::/8;
# everything is removed on exit or failure, every process runs under `timeout`, nothing touches
# the machine's own namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/provision.sh

case ${1:-} in -h|--help) sed -n '2,/^set -e/{/^set -e/d; s/^# \{0,1\}//; p}' "$0"; exit 0 ;; "") ;;
  *) echo "instructions.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;; esac
PINGS=${PINGS:-300} BULK_SECS=${BULK_SECS:-0} TOP=${TOP:-12}
[[ $PINGS =~ ^[0-9]+$ ]] && [ "$PINGS" -ge 10 ] && [ "$PINGS" -le 2000 ] \
  || { echo "instructions.sh: PINGS must be 10 to 2000, not '$PINGS'" >&2; exit 2; }
[[ $BULK_SECS =~ ^[0-9]+$ ]] && [ "$BULK_SECS" -le 60 ] \
  || { echo "instructions.sh: BULK_SECS must be 0 (no upload) to 60, not '$BULK_SECS'" >&2; exit 2; }
[[ $TOP =~ ^[0-9]+$ ]] && [ "$TOP" -le 100 ] || { echo "instructions.sh: TOP must be 0 to 100, not '$TOP'" >&2; exit 2; }
command -v valgrind >/dev/null && command -v callgrind_control >/dev/null \
  || { echo "instructions.sh: needs valgrind with callgrind_control" >&2; exit 2; }
need ping iputils-ping; need nft nftables; need python3 python3
[ "$BULK_SECS" = 0 ] || need iperf3 iperf3
[ "${SKIP_BORINGTUN:-}" = 1 ] || need wg wireguard-tools

TAG=hfi$$ UA=198.18.0.1 UB=198.18.0.2 PORT=51820
TOOLS=${BENCH_TOOLS:-$PWD/target/bench-tools}
WORK=$(mktemp -d /tmp/holdfast-instr.XXXX)
# valgrind starts a process in seconds and slows it about fifty-fold: room for both.
LIFE=$((PINGS / 10 + BULK_SECS * 3 + 300))
PIDS=() NETNS=()
cleanup() { bench_cleanup "${NETNS[@]:-}"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
stop_all() { local p; for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true; done
             for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done; PIDS=(); }

# The dump's per-thread files -> instructions in all, per thread, and each function's own.
cat >"$WORK/count.py" <<'PY'
import collections, glob, sys
prefix, per, unit, top, total_to = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
own = collections.Counter(); threads = []
for path in sorted(glob.glob(prefix + '*')):
    total = 0; fn = None; after_call = False
    for line in open(path, errors='replace'):
        if line.startswith('summary:'):
            total = int(line.split()[1])
        elif line.startswith('fn='):
            fn = line[3:].strip()
        elif line.startswith('calls='):
            after_call = True
        elif line[:1].isdigit() or line[:1] in '+-*':
            parts = line.split()
            if len(parts) >= 2:
                # The line after calls= is the call's inclusive cost, not the caller's own.
                if after_call:
                    after_call = False
                else:
                    own[fn] += int(parts[1])
    if total:
        threads.append(total)
if not threads:
    print('  nothing counted (no dump?)'); sys.exit(1)
threads.sort(reverse=True)
print('  %.0f instructions %s (busiest thread %.0f; %d threads ran)' % (sum(threads) / per, unit, threads[0] / per, len(threads)))
for name, n in own.most_common(top):
    print('  %9.0f  %4.1f%%  %s' % (n / per, 100.0 * n / sum(threads), name[:110]))
with open(total_to, 'w') as f:
    f.write('%f\n' % (sum(threads) / per))
PY

VG=(valgrind --tool=callgrind --dump-instr=no --compress-strings=no --compress-pos=no --separate-threads=yes)
RUN=0

# count TUNNEL END MODE: TUNNEL holdfast|boringtun, END client|gateway (the one under callgrind),
# MODE ping|bulk. Prints the count and leaves WORK/TUNNEL-END-MODE.total.
count() {
  local tunnel=$1 end=$2 mode=$3 na nb dst out gw cl pid f
  RUN=$((RUN + 1)); na=${TAG}${RUN}a nb=${TAG}${RUN}b; NETNS+=("$na" "$nb")
  out=$WORK/$tunnel-$end-$mode
  bench_pair_netns "$na" "$nb" ${TAG}${RUN}va ${TAG}${RUN}vb $UA $UB
  local under=("${VG[@]}" "--callgrind-out-file=$out.cg.%p")
  if [ "$tunnel" = holdfast ]; then
    dst=100.64.0.1
    rm -rf "$WORK/hf"; mkdir -p "$WORK/hf"
    provision_gateway "$BIN" "$WORK/hf" $UB:$PORT
    provision_client "$BIN" "$WORK/hf" default default
    gw=("$BIN" gateway run --dir "$WORK/hf/gw"); cl=("$CLIENT_BIN" run --no-tui --config "$WORK/hf/default.toml")
    if [ "$end" = gateway ]; then gw=("${under[@]}" "${gw[@]}"); else cl=("${under[@]}" "${cl[@]}"); fi
    bench_launch "$tunnel-$end-$mode-gw" ip netns exec "$nb" "${gw[@]}"
    # The client's first attempt would otherwise time out against a gateway still starting up.
    for _ in $(seq 100); do ip netns exec "$nb" ss -Hltn "sport = :$PORT" | grep -q . && break; sleep 0.2; done
    bench_launch "$tunnel-$end-$mode-client" ip netns exec "$na" "${cl[@]}"
  else
    dst=100.64.1.2
    rm -rf "$WORK/run" "$WORK"/*.key "$WORK"/*.pub; wg_prepare "$WORK"
    gw=("$BT" wgb --foreground --disable-drop-privileges --threads 1)
    cl=("$BT" wga --foreground --disable-drop-privileges --threads 1)
    if [ "$end" = gateway ]; then gw=("${under[@]}" "${gw[@]}"); else cl=("${under[@]}" "${cl[@]}"); fi
    bench_launch "$tunnel-$end-$mode-client" ip netns exec "$na" "${NSX[@]}" "${cl[@]}"
    bench_launch "$tunnel-$end-$mode-gw" ip netns exec "$nb" "${NSX[@]}" "${gw[@]}"
    wg_configure "$na" "$nb" wga wgb 100.64.1 $UA $UB $PORT "$WORK" \
      || { echo "boringtun: could not be configured"; tail -5 "$WORK/$tunnel-$end-$mode"-*.log; exit 1; }
  fi
  for _ in $(seq 150); do ip netns exec "$na" ping -q -c 1 -W 1 $dst >/dev/null 2>&1 && break; sleep 0.2; done
  ip netns exec "$na" ping -q -c 1 -W 2 $dst >/dev/null \
    || { echo "$tunnel: the tunnel did not come up"; tail -5 "$WORK/$tunnel-$end-$mode"-*.log; exit 1; }
  ip netns exec "$na" ping -q -n -c 50 -i 0.02 $dst >/dev/null
  f=$(ls "$out".cg.* 2>/dev/null | head -1); pid=${f##*.}
  [[ $pid =~ ^[0-9]+$ ]] || { echo "$tunnel $end: no callgrind output at $out.cg.*"; exit 1; }
  callgrind_control -z "$pid" >/dev/null
  if [ "$mode" = ping ]; then
    ip netns exec "$na" ping -q -n -c "$PINGS" -i 0.02 -W 2 $dst >/dev/null
    callgrind_control -d "$pid" >/dev/null
    echo "$tunnel $end, per ping ($PINGS pings):"
    python3 "$WORK/count.py" "$out.cg.$pid.1-" "$PINGS" "per ping" "$TOP" "$out.total"
  else
    ip netns exec "$nb" timeout $((BULK_SECS + 60)) iperf3 -s -1 -B $dst >/dev/null 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do ip netns exec "$nb" ss -Hltn "sport = :5201" | grep -q . && break; sleep 0.1; done
    ip netns exec "$na" timeout $((BULK_SECS + 60)) iperf3 -c $dst -t "$BULK_SECS" -J >"$out.json"
    callgrind_control -d "$pid" >/dev/null
    local mb
    mb=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['end']['sum_received']['bytes'] / 1e6)" "$out.json")
    echo "$tunnel $end, per MB of an upload ($mb MB in ${BULK_SECS} s, slowed by callgrind):"
    python3 "$WORK/count.py" "$out.cg.$pid.1-" "$mb" "per MB" "$TOP" "$out.total"
  fi
  stop_all
  ip netns del "$na"; ip netns del "$nb"; rm -rf "/etc/netns/$na" "/etc/netns/$nb"
}

ratio() { python3 -c "import sys; a, b = (float(open(p).read()) for p in sys.argv[1:]); print('%.2f' % (a / b))" "$@"; }

bench_header "instructions per ping and per MB  pings=$PINGS bulk=${BULK_SECS}s"
echo "# $(valgrind --version); user space only; ring's AES-GCM runs its AES-NI code under valgrind"
bench_binary
BT=$TOOLS/bin/boringtun-cli
if [ "${SKIP_BORINGTUN:-}" != 1 ] && [ ! -x "$BT" ]; then
  echo "# installing boringtun-cli into $TOOLS (once)"
  timeout 1800 cargo install --quiet --locked boringtun-cli --root "$TOOLS" >"$WORK/install.log" 2>&1 \
    || { echo "boringtun: skipped (cargo install failed)"; tail -5 "$WORK/install.log"; SKIP_BORINGTUN=1; }
fi
MODES=(ping); [ "$BULK_SECS" = 0 ] || MODES+=(bulk)
TUNNELS=(holdfast); [ "${SKIP_BORINGTUN:-}" = 1 ] || TUNNELS+=(boringtun)
for mode in "${MODES[@]}"; do
  for tunnel in "${TUNNELS[@]}"; do
    for end in client gateway; do count "$tunnel" "$end" "$mode"; done
  done
  if [ "${SKIP_BORINGTUN:-}" != 1 ]; then
    h=$WORK/holdfast b=$WORK/boringtun
    python3 -c "print('%.0f' % (float(open('$h-client-$mode.total').read()) + float(open('$h-gateway-$mode.total').read())))" >"$h-both-$mode.total"
    python3 -c "print('%.0f' % (float(open('$b-client-$mode.total').read()) + float(open('$b-gateway-$mode.total').read())))" >"$b-both-$mode.total"
    echo "holdfast / boringtun, $mode: client $(ratio "$h-client-$mode.total" "$b-client-$mode.total"), gateway $(ratio "$h-gateway-$mode.total" "$b-gateway-$mode.total"), both ends $(ratio "$h-both-$mode.total" "$b-both-$mode.total")"
  fi
done

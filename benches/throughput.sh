#!/usr/bin/env bash
# Data-plane benchmark (issue 17): TCP throughput both ways (iperf3 up, and down with -R), ping RTT,
# CPU seconds per GB through the tunnel (both ends together) and the client's peak RSS, through
# Holdfast, through two userspace WireGuard anchors (boringtun-cli and Mullvad's gotatun-cli) and over
# the bare veth, all in ONE run on this machine between two network namespaces, so the ratios
# compare like with like. Ends with the goals of issue 17, each MET or NOT MET.
#
#   bash benches/throughput.sh                # RUNS=3 SECS=10
#   bash benches/throughput.sh --quick        # RUNS=1 SECS=3: a smoke run
#   RUNS=3 SECS=8 bash benches/throughput.sh
#   PINGS=500 bash benches/throughput.sh      # pings per run (default 50): a steadier ping median
#   SKIP_BORINGTUN=1 SKIP_GOTATUN=1 SKIP_SPLIT=1 bash benches/throughput.sh
#   BIN=/path/to/holdfast bash benches/throughput.sh   # another build (default: cargo build --release)
#   CLIENT_BIN=/path/to/holdfast-client ...             # the client binary (default: beside BIN)
#   BENCH_TOOLS=DIR bash benches/throughput.sh          # where the anchors are (default target/bench-tools)
#
# Rows:
#   veth            the bare veth pair: the ceiling
#   holdfast        THE HEADLINE: the client file exactly as `gateway add-client` writes it (full
#                   tunnel, kill-switch on, DNS from the gateway's resolver), the gateway as `gateway
#                   init` writes it; only the client's log dir and status socket are moved into the
#                   bench's temp dir. The bench checks the kill-switch, routes and DNS are in force.
#                   The client runs as a client machine runs it: `holdfast-client run` (the
#                   client-only binary; `holdfast client run` is the same code in a binary that
#                   also carries the gateway, and maps more of it: see the README).
#   holdfast6       TCP over IPv6 inside the same tunnel (same processes)
#   holdfast-split  a split tunnel to the gateway's tunnel address, no kill-switch: the data plane alone
#   boringtun       boringtun-cli, one thread (--threads 1), configured with `wg`
#   gotatun         gotatun-cli (Mullvad's boringtun fork; its binary is `gotatun`), configured with `wg`
# Every row: RUNS iperf3 runs of SECS seconds each way (medians), PINGS pings per run (median RTT of all
# replies). The ping goal is read from neither row: with the headline tunnel up, boringtun runs in a
# second pair of namespaces and plain pings alternate between the two (10 blocks, PINGS x RUNS per
# tunnel), since a median drifts more within minutes than the gap between them. CPU s/GB:
# utime+stime (/proc/PID/stat) of the two tunnel processes (client and gateway, or both WireGuard
# peers) over each direction's iperf3 runs, divided by the bytes iperf3 received (GB = 10^9 bytes). Client RSS: VmHWM (/proc/PID/status) of the process in the client namespace,
# read after its row (holdfast6 shares holdfast's processes, so its figure includes both rows).
#
# Needs root. Creates two namespaces joined by a veth pair (and, for the alternating pings, a second
# pair for boringtun, deleted right after them) on 198.18.0.0/15 (tunnel addresses in
# 100.64.0.0/10 and fd00::/8) and /etc/netns/NAME/resolv.conf for each (the client rewrites its own
# namespace's copy, never the machine's); removes everything on exit or failure. Routes, kill-switch
# and DNS are applied inside the client's namespace only: never in the machine's own. Every process
# runs under `timeout`. The anchors are installed with `cargo install --locked` into
# BENCH_TOOLS (once, then cached); one that cannot be installed (no network) is reported and
# its row skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/provision.sh

for arg in "$@"; do
  case $arg in
    --quick) RUNS=${RUNS:-1} SECS=${SECS:-3} ;;
    -h|--help) sed -n '2,/^set -e/{/^set -e/d; s/^# \{0,1\}//; p}' "$0"; exit 0 ;;
    *) echo "throughput.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
RUNS=${RUNS:-3} SECS=${SECS:-10} PINGS=${PINGS:-50}
[[ $RUNS =~ ^[1-9]$ ]] || { echo "throughput.sh: RUNS must be 1 to 9, not '$RUNS'" >&2; exit 2; }
[[ $SECS =~ ^[0-9]+$ ]] && [ "$SECS" -ge 1 ] && [ "$SECS" -le 60 ] \
  || { echo "throughput.sh: SECS must be 1 to 60, not '$SECS'" >&2; exit 2; }
[[ $PINGS =~ ^[0-9]+$ ]] && [ "$PINGS" -ge 1 ] && [ "$PINGS" -le 1000 ] \
  || { echo "throughput.sh: PINGS must be 1 to 1000, not '$PINGS'" >&2; exit 2; }

TAG=hfb$$ NA=${TAG}a NB=${TAG}b VA=${TAG}va VB=${TAG}vb
# boringtun's own pair for the alternating pings (see "the ping goal" below)
NC=${TAG}c ND=${TAG}d VC=${TAG}vc VD=${TAG}vd
UA=198.18.0.1 UB=198.18.0.2 PORT=51820
TUN_GW=100.64.0.1 TUN_GW6=fd00:b:e::1
TOOLS=${BENCH_TOOLS:-$PWD/target/bench-tools}
WORK=$(mktemp -d /tmp/holdfast-bench.XXXX)
RESULTS=$WORK/results
CLK_TCK=$(getconf CLK_TCK)
# The longest a tunnel process may live: its section measures at most two rows, and the headline's
# also the alternating pings.
ALT_BLOCKS=10 ALT_EACH=$(( (PINGS * RUNS + 9) / 10 ))
LIFE=$((2 * RUNS * (2 * SECS + 80) + 120 + ALT_BLOCKS * ALT_EACH / 10 + 120))
TPIDS=()   # the `timeout` wrappers of the running tunnel processes

need iperf3 iperf3; need ping iputils-ping; need nft nftables; need python3 python3
[ "${SKIP_BORINGTUN:-}" = 1 ] && [ "${SKIP_GOTATUN:-}" = 1 ] || need wg wireguard-tools

# launch LOG CMD...: CMD in the background under `timeout` (bounded life), output in WORK/LOG.log;
# the wrapper's pid in LAST. TERM to the wrapper is passed on to CMD (an explicit stop).
launch() { local log=$1; shift; timeout -k 5 "$LIFE" "$@" >"$WORK/$log.log" 2>&1 & LAST=$!; TPIDS+=("$LAST"); }
stop() { # WRAPPER-PID...
  local p keep=() q
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "$@"; do wait "$p" 2>/dev/null || true; done
  for q in "${TPIDS[@]:-}"; do [[ " $* " == *" $q "* ]] || keep+=("$q"); done
  TPIDS=("${keep[@]:-}")
}
cleanup() {
  set +e
  for p in "${TPIDS[@]:-}"; do [ -n "$p" ] && stop "$p"; done
  for n in $NA $NB $NC $ND; do ip netns del $n 2>/dev/null; rm -rf "/etc/netns/$n"; done
  rmdir /etc/netns 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# proc_of WRAPPER-PID BINARY: the pid of BINARY below its timeout wrapper, once the exec chain
# (ip netns exec, unshare, sh) has reached it.
proc_of() {
  local c want; want=$(readlink -f "$2")
  for _ in $(seq 100); do
    for c in $(pgrep -P "$1"); do [ "$(readlink -f /proc/$c/exe 2>/dev/null)" = "$want" ] && { echo "$c"; return 0; }; done
    sleep 0.1
  done
  echo "throughput.sh: no $2 process below pid $1" >&2; return 1
}
cpu_ticks() { # PID...: utime+stime of the processes, all threads, in clock ticks
  local t=0 p; for p in "$@"; do t=$((t + $(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$p/stat"))); done; echo $t
}

# --- the report (python): parses iperf3's JSON, prints each row and the final table -----------
cat >"$WORK/report.py" <<'PY'
import json, statistics, sys

def iperf(text):
    """iperf3 -J output -> 'Gbit/s bytes' as received; '0 0' (and why, on stderr) when it failed."""
    try:
        d = json.loads(text)
    except ValueError:
        d = {"error": "no JSON output"}
    s = d.get("end", {}).get("sum_received")
    if d.get("error") or not s:
        print("iperf3 failed: %s" % d.get("error", "no result"), file=sys.stderr)
        print("0 0")
    else:
        print("%.3f %d" % (s["bits_per_second"] / 1e9, s["bytes"]))

def load(path):
    rows = {}
    for line in open(path):
        row, key, *vals = line.split()
        r = rows.setdefault(row, {"up": [], "down": [], "rtt": [], "rss": None, "label": row, "id": row, "skipped": None})
        if key in ("up", "down"):
            r[key].append((float(vals[0]), int(vals[1]), None if vals[2] == "-" else int(vals[2])))
        elif key == "rtt":
            r["rtt"] += [float(v) for v in vals]
        elif key == "rss":
            r["rss"] = int(vals[0]) / 1024
        elif key in ("alt-holdfast", "alt-boringtun"):
            r[key] = [float(v) for v in vals]
        else:
            r[key] = " ".join(vals)
    return rows

CLK = 100.0
def med(r, d): return statistics.median(g for g, _, _ in r[d]) if r[d] else 0.0
def rtt(r): return statistics.median(r["rtt"]) if r["rtt"] else None
def cpu(r, d):
    """CPU seconds of both tunnel processes per 10^9 bytes received, over all runs of direction d."""
    ticks = [t for _, _, t in r[d] if t is not None]
    nbytes = sum(b for _, b, _ in r[d])
    return (sum(ticks) / CLK) / (nbytes / 1e9) if ticks and nbytes else None
def f(x, fmt): return "" if x is None else fmt % x
def runs(r, d): return " / ".join("%.2f" % g for g, _, _ in r[d])

def row_line(r):
    return "%-15s up %6.2f (%s)  down %6.2f (%s)  ping %s ms  CPU s/GB %s / %s  client RSS %s MiB" % (
        r["id"], med(r, "up"), runs(r, "up"), med(r, "down"), runs(r, "down"),
        f(rtt(r), "%.3f"), f(cpu(r, "up"), "%.2f") or "-", f(cpu(r, "down"), "%.2f") or "-", f(r["rss"], "%.1f") or "-")

def ratio(a, b): return a / b if a and b else None
def alternating(rows):
    """The medians (ms) of the alternating pings through Holdfast and boringtun, or (None, None)."""
    a = rows.get("alt") or {}
    h, b = a.get("alt-holdfast"), a.get("alt-boringtun")
    return (statistics.median(h), statistics.median(b)) if h and b else (None, None)

def final(rows):
    print("\n| path | up Gbit/s (runs) | down Gbit/s (runs) | ping (median) | CPU s per GB, both ends (up / down) | client peak RSS |")
    print("|---|---|---|---|---|---|")
    for r in rows.values():
        if r["id"] == "alt":
            continue
        if r["skipped"]:
            print("| %s | skipped: %s | | | | |" % (r["label"], r["skipped"]))
            continue
        c = "%s / %s" % (f(cpu(r, "up"), "%.2f"), f(cpu(r, "down"), "%.2f")) if cpu(r, "up") is not None else ""
        print("| %s | %.2f (%s) | %.2f (%s) | %s | %s | %s |" % (
            r["label"], med(r, "up"), runs(r, "up"), med(r, "down"), runs(r, "down"),
            f(rtt(r), "%.3f ms"), c, f(r["rss"], "%.1f MiB")))
    hf = rows.get("holdfast")
    print()
    for other, what in (("veth", "of the bare veth"), ("holdfast-split", "split tunnel without kill-switch against the headline")):
        o = rows.get(other)
        if hf and o and not o["skipped"]:
            a, b = (o, hf) if other == "holdfast-split" else (hf, o)
            print("%-28s up %s  down %s  (%s)" % ("%s/%s" % (a["id"], b["id"]),
                  f(ratio(med(a, "up"), med(b, "up")), "%.2fx"), f(ratio(med(a, "down"), med(b, "down")), "%.2fx"), what))
    for anchor in ("boringtun", "gotatun"):
        a = rows.get(anchor)
        if hf and a and not a["skipped"]:
            print("%-28s up %s  down %s  ping %s (lower is better)" % ("holdfast/" + anchor,
                  f(ratio(med(hf, "up"), med(a, "up")), "%.2fx"), f(ratio(med(hf, "down"), med(a, "down")), "%.2fx"),
                  f(ratio(rtt(hf), rtt(a)), "%.2fx")))
    a_hf, a_bt = alternating(rows)
    if a_hf and a_bt:
        print("%-28s ping %.2fx (%.3f against %.3f ms: medians of %d / %d pings, alternating in blocks)" % (
              "holdfast/boringtun, alt.", a_hf / a_bt, a_hf, a_bt, len(rows["alt"]["alt-holdfast"]), len(rows["alt"]["alt-boringtun"])))
    h6 = rows.get("holdfast6")
    if hf and h6:
        print("%-28s up %s  down %s  (TCP over IPv6 vs IPv4 in the same tunnel)" % ("holdfast6/holdfast",
              f(ratio(med(h6, "up"), med(hf, "up")), "%.2fx"), f(ratio(med(h6, "down"), med(hf, "down")), "%.2fx")))
    print("\nGoals of issue 17 (Holdfast = the headline row; anchors measured in this run):")
    def goal(name, value, ok, missing=None):
        verdict = ("n/a (%s)" % missing) if missing else ("MET" if ok else "NOT MET")
        print("  %-52s %-16s %s" % (name, value, verdict))
    if not hf:
        print("  no holdfast row"); return
    for anchor in ("boringtun", "gotatun"):
        a = rows.get(anchor)
        missing = "%s not measured%s" % (anchor, ": " + a["skipped"] if a and a["skipped"] else "") if not a or a["skipped"] else None
        for d in ("up", "down"):
            x = None if missing else ratio(med(hf, d), med(a, d))
            goal("Holdfast/%s %s >= 4x" % (anchor, d), f(x, "%.2fx"), x is not None and x >= 4, missing if missing or x is not None else "no throughput")
    # The alternating pings where they ran: the rows' separate medians, minutes apart, drift more
    # than the gap this goal is about.
    a_hf, a_bt = alternating(rows)
    if a_hf and a_bt:
        x = a_hf / a_bt
        goal("ping Holdfast <= boringtun, alternating (<= 1)", "%.2fx (%.3f ms)" % (x, a_hf), x <= 1)
    else:
        bt = rows.get("boringtun")
        missing = None if bt and not bt["skipped"] and rtt(bt) else "boringtun ping not measured"
        x = None if missing else ratio(rtt(hf), rtt(bt))
        goal("ping Holdfast <= boringtun, separate medians (<= 1)", f(x, "%.2fx") + f(rtt(hf), " (%.3f ms)"), x is not None and x <= 1, missing)
    for d in ("up", "down"):
        x = cpu(hf, d)
        goal("CPU s per GB %s, client + gateway <= 1.5" % d, f(x, "%.2f"), x is not None and x <= 1.5, None if x is not None else "not measured")
    x = hf["rss"]
    goal("client peak RSS under load <= 12 MiB", f(x, "%.1f MiB"), x is not None and x <= 12, None if x is not None else "not measured")

if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "iperf":
        iperf(sys.stdin.read())
    else:
        CLK = float(sys.argv[3])
        rows = load(sys.argv[2])
        if mode == "row":
            print(row_line(rows[sys.argv[4]]))
        else:
            final(rows)
PY
report() { python3 "$WORK/report.py" "$1" "$RESULTS" "$CLK_TCK" "${@:2}"; }

# --- measurement --------------------------------------------------------------------------------
iperf_run() { # ROW up|down SERVER-IP PID...: one iperf3 run; the PIDs' CPU time is taken around it
  local row=$1 dir=$2 ip=$3 rev=() t0=- t1 json sp; shift 3
  [ "$dir" = down ] && rev=(-R)
  timeout $((SECS + 30)) ip netns exec $NB iperf3 -s -1 -B "$ip" >/dev/null 2>&1 & sp=$!
  for _ in $(seq 50); do ip netns exec $NB ss -ltn | grep -q ":5201 " && break; sleep 0.1; done
  [ $# -gt 0 ] && t0=$(cpu_ticks "$@")
  json=$(timeout $((SECS + 20)) ip netns exec $NA iperf3 -c "$ip" -t "$SECS" -J "${rev[@]}") || true
  [ $# -gt 0 ] && t1=$(cpu_ticks "$@") && t0=$((t1 - t0))
  wait $sp 2>/dev/null || true
  echo "$row $dir $(python3 "$WORK/report.py" iperf <<<"$json") $t0" >>"$RESULTS"
}
rtts() { # NS IP COUNT: the RTTs (ms) of COUNT plain pings from NS, on one line; empty, not a
  # failure of the bench, if none came back (ping's exit status 1)
  timeout $(($3 / 25 + 20)) ip netns exec "$1" ping -n -c "$3" -i 0.02 -W 1 "$2" 2>/dev/null \
    | sed -n 's/.* time=\([0-9.]*\) ms$/\1/p' | tr '\n' ' ' || true
}
ping_run() { # ROW IP: the RTT of each of PINGS replies
  echo "$1 rtt $(rtts $NA "$2" "$PINGS")" >>"$RESULTS"
}
measure() { # ROW SERVER-IP [CLIENT-SIDE-PID OTHER-END-PID]
  local row=$1 ip=$2; shift 2
  for _ in $(seq "$RUNS"); do iperf_run "$row" up "$ip" "$@"; iperf_run "$row" down "$ip" "$@"; ping_run "$row" "$ip"; done
  [ $# -gt 0 ] && echo "$row rss $(awk '/^VmHWM/{print $2}' "/proc/$1/status")" >>"$RESULTS"
  report row "$row"
}
skip() { echo "$1 skipped ${*:2}" >>"$RESULTS"; echo "$1: SKIPPED: ${*:2}"; }
version() { "$1" --version 2>/dev/null | awk 'NR == 1 {print $NF}'; }
install_anchor() { # CRATE BINARY: the binary's path in ANCHOR, installing it once into TOOLS
  ANCHOR=$TOOLS/bin/$2
  [ -x "$ANCHOR" ] && return 0
  echo "# installing $1 into $TOOLS (once)"
  timeout 1800 cargo install --quiet --locked "$1" --root "$TOOLS" >"$WORK/install-$1.log" 2>&1 && return 0
  tail -5 "$WORK/install-$1.log" | sed 's/^/#   /'; return 1
}

# --- topology -------------------------------------------------------------------------------
# The client rewrites its namespace's resolv.conf to the gateway's resolver (DNS as the default
# client file has it); the bench makes no queries.
bench_pair_netns $NA $NB $VA $VB $UA $UB

bench_header "holdfast data-plane bench  runs=$RUNS secs=$SECS"
echo "# on a shared machine only the ratios against the anchors measured in this run count"
bench_binary
echo "veth label bare veth" >>"$RESULTS"
measure veth $UB

# --- holdfast: gateway in B, clients in A, one after the other --------------------------------
provision_gateway "$BIN" "$WORK" $UB:$PORT
provision_client "$BIN" "$WORK" default default
[ "${SKIP_SPLIT:-}" = 1 ] || provision_client "$BIN" "$WORK" split split
launch gw ip netns exec $NB "$BIN" gateway run --dir "$WORK/gw"; GW_W=$LAST
GW_PID=$(proc_of $GW_W "$BIN")
client_up() { # NAME: runs the client of WORK/NAME.toml until its tunnel answers; CL_W, CL_PID
  launch "client-$1" ip netns exec $NA "$CLIENT_BIN" run --no-tui --config "$WORK/$1.toml"; CL_W=$LAST
  for _ in $(seq 100); do ip netns exec $NA ping -q -c 1 -W 1 $TUN_GW >/dev/null 2>&1 && break; sleep 0.1; done
  ip netns exec $NA ping -q -c 1 -W 2 $TUN_GW >/dev/null \
    || { echo "holdfast tunnel ($1 client) did not come up"; tail -20 "$WORK/client-$1.log" "$WORK/gw.log"; exit 1; }
  CL_PID=$(proc_of $CL_W "$CLIENT_BIN")
}

client_up default
# The headline must measure what a user runs: check the default file's set-up is in force (the
# routes and DNS follow the TUN device's creation: give them a few seconds).
headline_in_force() {
  ip netns exec $NA nft list table inet holdfast >/dev/null 2>&1 || { WHY="no kill-switch table"; return 1; }
  for r in 0.0.0.0/1 128.0.0.0/1 ::/1 8000::/1; do
    ip -n $NA "$([[ $r == *:* ]] && echo -6 || echo -4)" route show "$r" | grep -q 'dev holdfast0' || { WHY="no full-tunnel route $r"; return 1; }
  done
  grep -q "^nameserver $TUN_GW\$" /etc/netns/$NA/resolv.conf || { WHY="the gateway's resolver is not in the client's resolv.conf"; return 1; }
}
for _ in $(seq 50); do headline_in_force && break; sleep 0.1; done
headline_in_force || { echo "headline set-up not in force in the client namespace: $WHY"; exit 1; }
echo "# headline set-up in force in the client namespace: kill-switch (nftables table inet holdfast), routes 0.0.0.0/1 128.0.0.0/1 ::/1 8000::/1 dev holdfast0, DNS $TUN_GW"
echo "holdfast label Holdfast, default client file (full tunnel, kill-switch on)" >>"$RESULTS"
measure holdfast $TUN_GW $CL_PID $GW_PID
echo "holdfast6 label Holdfast, TCP over IPv6 inside the same tunnel" >>"$RESULTS"
measure holdfast6 $TUN_GW6 $CL_PID $GW_PID

# --- the ping goal: Holdfast and boringtun alternating ------------------------------------------
# A tunnel's ping median drifts by a fifth within minutes on a shared machine: more than the gap the
# goal is about, so the rows' separate medians, minutes apart, cannot settle it. With the headline
# tunnel still up, boringtun (one thread) comes up in a second pair of namespaces, and plain pings
# alternate between the two in ALT_BLOCKS blocks (PINGS x RUNS per tunnel in all), as
# benches/hops.sh does; the goal line reads their medians. Without boringtun the goal falls back to
# the rows' medians and says so.
alternate() {
  local wc wd hf=() bt=()
  bench_pair_netns $NC $ND $VC $VD $UA $UB
  wg_prepare "$WORK"
  launch alt-c ip netns exec $NC "${NSX[@]}" "$ANCHOR" wgc --foreground --disable-drop-privileges --threads 1; wc=$LAST
  launch alt-d ip netns exec $ND "${NSX[@]}" "$ANCHOR" wgd --foreground --disable-drop-privileges --threads 1; wd=$LAST
  if wg_configure $NC $ND wgc wgd 100.64.3 $UA $UB $PORT "$WORK"; then
    for _ in $(seq 20); do ip netns exec $NC ping -q -c 1 -W 1 100.64.3.2 >/dev/null 2>&1 && break; done
    for _ in $(seq $ALT_BLOCKS); do
      hf+=($(rtts $NA $TUN_GW $ALT_EACH)); bt+=($(rtts $NC 100.64.3.2 $ALT_EACH))
    done
  fi
  stop $wc $wd
  for n in $NC $ND; do ip netns del $n 2>/dev/null; rm -rf "/etc/netns/$n"; done
  if [ ${#hf[@]} -gt 0 ] && [ ${#bt[@]} -gt 0 ]; then
    echo "alt alt-holdfast ${hf[*]}" >>"$RESULTS"; echo "alt alt-boringtun ${bt[*]}" >>"$RESULTS"
    echo "# alternating pings: ${#hf[@]} through Holdfast, ${#bt[@]} through boringtun, in $ALT_BLOCKS blocks"
  else
    echo "# alternating pings: boringtun's second tunnel did not come up (see its log); the ping goal uses the rows' medians"
    tail -3 "$WORK/alt-c.log" "$WORK/alt-d.log" 2>/dev/null
  fi
}
if [ "${SKIP_BORINGTUN:-}" != 1 ] && install_anchor boringtun-cli boringtun-cli; then
  alternate
fi
stop $CL_W
if [ "${SKIP_SPLIT:-}" != 1 ]; then
  # The stop above removed the kill-switch, routes and DNS; wait until the TUN device is gone too.
  for _ in $(seq 50); do ip -n $NA link show holdfast0 >/dev/null 2>&1 || break; sleep 0.1; done
  client_up split
  echo "holdfast-split label Holdfast, split tunnel, no kill-switch" >>"$RESULTS"
  measure holdfast-split $TUN_GW $CL_PID $GW_PID
  stop $CL_W
fi
stop $GW_W

# --- the userspace WireGuard anchors, configured with `wg` -------------------------------------
anchor() { # ROW BINARY IF-A IF-B NET(a /24 prefix in 100.64.0.0/10, as 100.64.N) EXTRA-ARGS...
  local row=$1 bin=$2 ia=$3 ib=$4 net=$5 wa wb pa pb; shift 5
  launch "$row-a" ip netns exec $NA "${NSX[@]}" "$bin" "$ia" --foreground --disable-drop-privileges "$@"; wa=$LAST
  launch "$row-b" ip netns exec $NB "${NSX[@]}" "$bin" "$ib" --foreground --disable-drop-privileges "$@"; wb=$LAST
  wg_configure $NA $NB "$ia" "$ib" "$net" $UA $UB $PORT "$WORK" \
    || { skip "$row" "could not be configured (see its log)"; tail -5 "$WORK/$row-a.log" "$WORK/$row-b.log"; stop $wa $wb; return 0; }
  for _ in $(seq 20); do ip netns exec $NA ping -q -c 1 -W 1 "$net.2" >/dev/null 2>&1 && break; done
  if ! ip netns exec $NA ping -q -c 1 -W 2 "$net.2" >/dev/null 2>&1; then
    skip "$row" "its tunnel did not come up"; tail -5 "$WORK/$row-a.log" "$WORK/$row-b.log"; stop $wa $wb; return 0
  fi
  pa=$(proc_of $wa "$bin") && pb=$(proc_of $wb "$bin") || { skip "$row" "its processes were not found"; stop $wa $wb; return 0; }
  measure "$row" "$net.2" "$pa" "$pb"
  stop $wa $wb
}
if [ "${SKIP_BORINGTUN:-}" != 1 ] || [ "${SKIP_GOTATUN:-}" != 1 ]; then
  wg_prepare "$WORK"
fi
if [ "${SKIP_BORINGTUN:-}" = 1 ]; then
  skip boringtun "SKIP_BORINGTUN=1"
elif install_anchor boringtun-cli boringtun-cli; then
  echo "boringtun label boringtun-cli $(version "$ANCHOR"), 1 thread" >>"$RESULTS"
  anchor boringtun "$ANCHOR" wga wgb 100.64.1 --threads 1
else
  skip boringtun "boringtun-cli could not be installed (cargo install failed, see above)"
fi
if [ "${SKIP_GOTATUN:-}" = 1 ]; then
  skip gotatun "SKIP_GOTATUN=1"
elif install_anchor gotatun-cli gotatun; then
  echo "gotatun label gotatun-cli $(version "$ANCHOR") (Mullvad)" >>"$RESULTS"
  anchor gotatun "$ANCHOR" gta gtb 100.64.2
else
  skip gotatun "gotatun-cli could not be installed (cargo install failed, see above)"
fi

echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
report final

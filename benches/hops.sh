#!/usr/bin/env bash
# Where a lone ping's time goes (issue 17's latency goal): the round trip of one ping through the
# tunnel, cut into its five hops from kernel tracepoints (perf), through Holdfast (the client file
# as `gateway add-client` writes it, as in throughput.sh's headline) and through boringtun-cli
# (one thread), in one run on this machine.
#
#   bash benches/hops.sh                     # PINGS=200 pings, one every INTERVAL=0.02 s
#   INTERVAL=0.001 bash benches/hops.sh      # pings closer together: the threads stay warm
#   SKIP_BORINGTUN=1 bash benches/hops.sh    # Holdfast alone; BIN= / CLIENT_BIN= another build
#   ALTERNATIONS=20 bash benches/hops.sh     # blocks of the alternating plain pings (default 10)
#   STEPS=1 bash benches/hops.sh             # each hop cut further, step by step (below)
#   PIN=1 bash benches/hops.sh               # gateways on CPU 0, clients and pings on CPU 1
#
# The hops, each from one tracepoint to the next (net:net_dev_start_xmit when a packet is sent
# on a device, net:netif_rx / net:netif_receive_skb when one is received):
#   client out      the ping enters the client's tunnel device -> its datagram leaves the
#                   client's veth (the client process: wake-up, read, seal, send)
#   gateway in      -> the packet enters the gateway's tunnel device (the veth, then the gateway
#                   process: wake-up, receive, open, write)
#   gateway kernel  -> the echo reply leaves into the gateway's tunnel device (the kernel alone)
#   gateway out     -> its datagram leaves the gateway's veth (the gateway process again)
#   client in       -> the reply enters the client's tunnel device (the client process again)
# plus the median of plain pings without tracing (tracing adds a few microseconds per event), and
# the time the tunnel's processes ran on a CPU during those plain pings, per ping, both ends
# together (all their threads, from /proc/PID/task/*/schedstat): how much of a round trip is work
# done in them, woken cold, rather than waiting; then the same per thread, with the time each
# waited to run once woken (schedstat's run delay), how often it ran and its minor page faults.
# Medians over all pings. Last, with both tunnels up (each in its own pair of namespaces), plain
# pings alternate between them in ALTERNATIONS blocks
# (PINGS per tunnel in all): the ratio of those medians is the one to quote, since a tunnel's median
# drifts by a third within minutes on a shared machine.
#
# With STEPS=1 the traced pings also record every wake-up and context switch (sched:), a socket's
# data becoming ready (sock:sk_data_ready, which splits a receive path in the kernel from the
# wake-up of its reader) and the tunnel threads' receives, reads, writes and sends (syscalls:).
# Each tunnel's most common sequence of those steps per round trip is printed with the median time
# of each step, then both tunnels' side by side, step against step where the sequences agree.
# Tracing adds a few microseconds per event to both tunnels alike.
#
# Needs root and perf with tracepoint support; ping, nftables, python3 and wireguard-tools are
# installed if missing. Two namespaces joined by a veth pair on 198.18.0.0/15,
# tunnels in 100.64.0.0/10 and fd00::/8; everything is removed on exit or failure, every process
# runs under `timeout`, nothing touches the machine's own namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/provision.sh

case ${1:-} in -h|--help) sed -n '2,/^set -e/{/^set -e/d; s/^# \{0,1\}//; p}' "$0"; exit 0 ;; "") ;;
  *) echo "hops.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;; esac
PINGS=${PINGS:-200} INTERVAL=${INTERVAL:-0.02}
[[ $PINGS =~ ^[0-9]+$ ]] && [ "$PINGS" -ge 10 ] && [ "$PINGS" -le 2000 ] \
  || { echo "hops.sh: PINGS must be 10 to 2000, not '$PINGS'" >&2; exit 2; }
ALTERNATIONS=${ALTERNATIONS:-10}
[[ $ALTERNATIONS =~ ^[0-9]+$ ]] && [ "$ALTERNATIONS" -ge 1 ] && [ "$ALTERNATIONS" -le "$PINGS" ] \
  || { echo "hops.sh: ALTERNATIONS must be 1 to PINGS ($PINGS), not '$ALTERNATIONS'" >&2; exit 2; }
[[ $INTERVAL =~ ^0\.[0-9]+$|^[1-9]$ ]] || { echo "hops.sh: INTERVAL must be seconds like 0.02, not '$INTERVAL'" >&2; exit 2; }
STEPS=${STEPS:-0}
[[ $STEPS =~ ^[01]$ ]] || { echo "hops.sh: STEPS must be 0 or 1, not '$STEPS'" >&2; exit 2; }
command -v perf >/dev/null || { echo "hops.sh: needs perf (linux-perf) for the kernel's tracepoints" >&2; exit 2; }
need ping iputils-ping; need nft nftables; need python3 python3
[ "${SKIP_BORINGTUN:-}" = 1 ] || need wg wireguard-tools
# PIN=1: both tunnels' gateway ends on CPU 0, their client ends and every ping on CPU 1 (taskset),
# as if each gateway were on another machine: no gateway thread then shares a CPU with the client
# side, which on one machine decides much of a round trip (see the README's "Ping, session 18").
bench_pin hops.sh

TAG=hfh$$ NA=${TAG}a NB=${TAG}b VA=${TAG}va VB=${TAG}vb
# boringtun's own pair, so that both tunnels are up at once (the client's kill-switch would block
# boringtun's datagrams in Holdfast's namespace) and their plain pings can alternate.
NC=${TAG}c ND=${TAG}d VC=${TAG}vc VD=${TAG}vd
UA=198.18.0.1 UB=198.18.0.2 PORT=51820
TOOLS=${BENCH_TOOLS:-$PWD/target/bench-tools}
WORK=$(mktemp -d /tmp/holdfast-hops.XXXX)
LIFE=$((PINGS * 2 + 300))
PIDS=()
cleanup() { bench_cleanup $NA $NB $NC $ND; }
trap cleanup EXIT
trap 'exit 130' INT TERM
stop_all() { local p; for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true; done
             for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done; PIDS=(); }

# --- the analysis (python): tracepoints -> per-ping hops -> medians ------------------------------
cat >"$WORK/perfscript.py" <<'PY'
# The lines of `perf script -F comm,tid,cpu,time,event,trace`, for hops.py and steps.py.
import re
LINE = re.compile(r'^\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)$')
def events(path):
    """(time in us, comm, tid, cpu, event, the event's fields) for each event line of `path`."""
    for l in open(path):
        m = LINE.match(l)
        if m:
            comm, tid, cpu, t, name, rest = m.groups()
            yield float(t) * 1e6, comm, int(tid), int(cpu), name, rest
PY
cat >"$WORK/hops.py" <<'PY'
import re, statistics, sys
from perfscript import events
script, ctun, gtun, va, vb = sys.argv[1:6]
ev = []
for t, comm, _, _, name, rest in events(script):
    dev = re.search(r'dev=(\S+)', rest)
    ev.append((t, comm, name, dev.group(1) if dev else None, rest))
def sent(dev): return lambda e: e[2] == 'net:net_dev_start_xmit' and e[3] == dev
def recv(dev): return lambda e: e[2] in ('net:netif_rx', 'net:netif_receive_skb') and e[3] == dev
def after(i, pred, within=5000.0):
    for j in range(i + 1, len(ev)):
        if ev[j][0] - ev[i][0] > within: return None
        if pred(ev[j]): return j
    return None
names = ['client out', 'gateway in', 'gateway kernel', 'gateway out', 'client in', 'round trip']
hops = {k: [] for k in names}
for s, e in enumerate(ev):
    if not (e[1] == 'ping' and sent(ctun)(e)): continue
    a = after(s, sent(va)); b = a and after(a, recv(gtun)); c = b and after(b, sent(gtun))
    d = c and after(c, sent(vb)); f = d and after(d, recv(ctun))
    if not f: continue
    t = [ev[k][0] for k in (s, a, b, c, d, f)]
    for k, name in enumerate(names[:5]): hops[name].append(t[k + 1] - t[k])
    hops['round trip'].append(t[5] - t[0])
if not hops['round trip']:
    print('no complete round trip found in the trace'); sys.exit(1)
for name in names:
    v = sorted(hops[name])
    print('  %-15s median %6.1f us   p10 %6.1f   p90 %6.1f' % (name, statistics.median(v), v[len(v) // 10], v[len(v) * 9 // 10]))
print('  %d round trips traced' % len(hops['round trip']))
PY
cat >"$WORK/steps.py" <<'PY'
# STEPS=1: each round trip as a sequence of steps (events of the ping, the client's and the
# gateway's packet threads), the most common sequence and each step's median; with --side, two
# such results side by side.
import collections, json, re, statistics, sys
if sys.argv[1] == '--side':
    import difflib
    a, b = (json.load(open(f)) for f in sys.argv[2:4])
    la, lb = [l for l, _ in a['steps']], [l for l, _ in b['steps']]
    print('  %7s %7s %7s  step (a: %s, b: %s; a step in one sequence only is shown alone)' % ('a', 'b', 'a - b', a['row'], b['row']))
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, la, lb, autojunk=False).get_opcodes():
        if op == 'equal':
            for (label, x), (_, y) in zip(a['steps'][i1:i2], b['steps'][j1:j2]):
                print('  %7.1f %7.1f %+7.1f  %s' % (x, y, x - y, label))
            continue
        for label, x in a['steps'][i1:i2]:
            print('  %7.1f %7s %7s  %s' % (x, '', '', label))
        for label, y in b['steps'][j1:j2]:
            print('  %7s %7.1f %7s  %s' % ('', y, '', label))
    print('  %7.1f %7.1f %+7.1f  in all' % (a['total'], b['total'], a['total'] - b['total']))
    sys.exit(0)
from perfscript import events
script, out, row, ctun, gtun, va, vb = sys.argv[1:8]
ev = [(t, comm, tid, cpu, name.split(':')[1], rest) for t, comm, tid, cpu, name, rest in events(script)]
devs = {ctun: 'client tun', gtun: 'gateway tun', va: 'client veth', vb: 'gateway veth'}
def field(rest, key):
    m = re.search(key + r'=(\S+)', rest); return m and m.group(1)
def role(roles, tid, comm):
    """'client' or 'gateway' for the tunnel's packet threads, 'ping' for ping, else None."""
    return roles.get(tid, 'ping' if comm == 'ping' else None)
def step(e, roles):
    t, comm, tid, cpu, name, rest = e
    who = role(roles, tid, comm)
    if name in ('net_dev_start_xmit', 'netif_rx', 'netif_receive_skb'):
        d = devs.get(field(rest, 'dev'))
        return d and '%s: %s on the %s' % (who or comm, 'sent' if name == 'net_dev_start_xmit' else name, d)
    if name in ('sched_waking', 'sched_wakeup'):
        target = role(roles, int(field(rest, 'pid')), field(rest, 'comm'))
        # `target_cpu` is where the task last ran on a waking, where it will run on a wakeup.
        where = ' (cpu %s)' % int(field(rest, 'target_cpu')) if name == 'sched_wakeup' else ''
        return target and '%s: %s %s%s' % (who or comm, name[6:], target, where)
    if name == 'sk_data_ready':
        # A socket (or a TUN device's queue) got data, before its reader is woken.
        return who and '%s: data ready' % who
    if name == 'sched_switch':
        target = role(roles, int(field(rest, 'next_pid')), field(rest, 'next_comm'))
        return target and 'cpu %d runs %s' % (cpu, target)
    if who in ('client', 'gateway'):
        if name.startswith('sys_exit_'):
            kind = {'epoll_wait': 'epoll_wait', 'read': 'read'}.get(name[9:], 'receive')
            return '%s: %s returns%s' % (who, kind, ' nothing' if rest.split()[-1].startswith('0xfff') else '')
        if name.startswith('sys_enter_'):
            return '%s: %s' % (who, 'write' if name[10:].startswith('write') else 'send')
    return None
seqs = collections.defaultdict(list)
for s, e in enumerate(ev):
    if not (e[1] == 'ping' and e[4] == 'net_dev_start_xmit' and field(e[5], 'dev') == ctun):
        continue
    # The client's thread is the one that sends the datagram on the client's veth, the gateway's
    # the one that writes the packet into the gateway's tunnel device.
    window = [e2 for e2 in ev[s:s + 4000] if e2[0] - e[0] <= 5000]
    client = next((x[2] for x in window if x[4] == 'net_dev_start_xmit' and field(x[5], 'dev') == va), None)
    gateway = next((x[2] for x in window if x[4] == 'netif_receive_skb' and field(x[5], 'dev') == gtun), None)
    if client is None or gateway is None or client == gateway:
        continue
    roles, labels, times, back = {client: 'client', gateway: 'gateway'}, [], [], False
    for e2 in window:
        label = step(e2, roles)
        if label:
            labels.append(label); times.append(e2[0])
        if e2[4] == 'netif_receive_skb' and field(e2[5], 'dev') == ctun: back = True
        if back and label and label.endswith('runs ping'): break
    else:
        continue  # the reply never came back to ping within the window
    seqs[tuple(labels)].append([b - a for a, b in zip(times, times[1:])])
if not seqs:
    print('  no complete round trip found'); sys.exit(0)
labels, runs = max(seqs.items(), key=lambda kv: len(kv[1]))
medians = [statistics.median(col) for col in zip(*runs)]
print('  the most common sequence: %d of %d round trips, %d steps (median time since the step before, us)'
      % (len(runs), sum(len(v) for v in seqs.values()), len(labels)))
for label, m in zip(labels[1:], medians):
    print('  %7.1f  %s' % (m, label))
print('  %7.1f  in all' % sum(medians))
json.dump({'row': row, 'steps': list(zip(labels[1:], medians)), 'total': sum(medians)}, open(out, 'w'))
PY
rtts() { # NS IP COUNT: the RTTs of COUNT plain pings from NS, in ms, one per line
  "${CL_CPU[@]}" ip netns exec "$1" ping -n -c "$3" -i "$INTERVAL" -W 1 "$2" 2>/dev/null | grep -o 'time=[0-9.]*' | cut -d= -f2
}
median() { python3 -c "import statistics,sys; v=[float(x) for x in sys.stdin.read().split()]; print('%.3f' % statistics.median(v) if v else 'none')"; }
threads() { # PID...: one line per thread: "PID/TID COMM ON-CPU-NS WAITING-NS RUNS MINOR-FAULTS"
  local p t
  for p in "$@"; do for t in /proc/"$p"/task/*; do
    # schedstat, then the minor faults (the 8th field after the ")" that ends the name in stat)
    [ -r "$t/schedstat" ] && echo "$p/${t##*/} $(tr ' ' '_' <"$t/comm" 2>/dev/null) $(cat "$t/schedstat" 2>/dev/null)" \
      "$(sed 's/.*) //' "$t/stat" 2>/dev/null | cut -d' ' -f8)"
  done; done
}
oncpu_ns() { # THREADS-FILE: the time its threads have run on a CPU, in ns, all together
  awk '{t += $3} END {printf "%d", t}' "$1"
}
per_thread() { # BEFORE AFTER PINGS: each thread's time on a CPU, time waiting, runs and minor faults, per ping
  python3 - "$@" <<'PY'
import sys
def load(path):
    out = {}
    for line in open(path):
        f = line.split()
        if len(f) == 6:
            out[f[0]] = (f[1], int(f[2]), int(f[3]), int(f[4]), int(f[5]))
    return out
a, b, n = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3])
for tid, (comm, on1, wait1, runs1, flt1) in sorted(b.items()):
    _, on0, wait0, runs0, flt0 = a.get(tid, (comm, 0, 0, 0, 0))
    if runs1 > runs0:
        print('    %-16s %-18s on CPU %6.1f us  waiting %6.1f us  runs %5.2f  page faults %5.2f  (per ping)'
              % (tid, comm, (on1 - on0) / n / 1e3, (wait1 - wait0) / n / 1e3, (runs1 - runs0) / n,
                 (flt1 - flt0) / n))
PY
}
measure() { # ROW NS TARGET CLIENT-TUN GATEWAY-TUN UNDERLAY-A UNDERLAY-B PID... (the tunnel's processes)
  local row=$1 ns=$2 ip=$3 c0 c1 median
  ip netns exec "$ns" ping -q -n -c 20 -i 0.02 "$ip" >/dev/null   # past the first packets' set-up
  threads "${@:8}" >"$WORK/$row.threads0"
  median=$(rtts "$ns" "$ip" "$PINGS" | median)
  threads "${@:8}" >"$WORK/$row.threads1"
  c0=$(oncpu_ns "$WORK/$row.threads0") c1=$(oncpu_ns "$WORK/$row.threads1")
  # CPU per ping (both ends, all threads; a keepalive or a status tick in the window counts too):
  # what of a round trip is work done in the tunnel's processes, the rest being the kernel's path
  # and waiting to be scheduled.
  echo "$row: plain ping median $median ms ($PINGS pings, one every $INTERVAL s); on CPU $(( (c1 - c0) / PINGS / 1000 )) us per ping, both ends"
  # Which threads that is, and how long each waited to run once woken (a wake-up onto an idle
  # vCPU shows here as waiting): the threads that ran during the plain pings.
  per_thread "$WORK/$row.threads0" "$WORK/$row.threads1" "$PINGS"
  local extra=() filter="" p t
  if [ "$STEPS" = 1 ]; then
    # The syscalls of the tunnel's own threads only (a system-wide trace of every read is huge).
    for p in "${@:8}"; do for t in /proc/"$p"/task/*; do filter="${filter:+$filter || }common_pid == ${t##*/}"; done; done
    extra=(-e sched:sched_waking -e sched:sched_wakeup -e sched:sched_switch -e sock:sk_data_ready)
    for t in sys_exit_epoll_wait sys_exit_recvmsg sys_exit_recvfrom sys_exit_recvmmsg sys_exit_read \
             sys_enter_write sys_enter_writev sys_enter_sendto sys_enter_sendmsg sys_enter_sendmmsg; do
      extra+=(-e "syscalls:$t" --filter "$filter")
    done
  fi
  perf record -q -o "$WORK/$row.data" -a -e net:net_dev_start_xmit -e net:netif_rx -e net:netif_receive_skb "${extra[@]}" \
      -- timeout $((PINGS + 60)) "${CL_CPU[@]}" ip netns exec "$ns" ping -q -n -c "$PINGS" -i "$INTERVAL" -W 1 "$ip" >/dev/null 2>&1
  perf script -i "$WORK/$row.data" -F comm,tid,cpu,time,event,trace >"$WORK/$row.txt" 2>/dev/null
  echo "$row: traced, per hop"
  python3 "$WORK/hops.py" "$WORK/$row.txt" "$4" "$5" "$6" "$7"
  if [ "$STEPS" = 1 ]; then
    echo "$row: step by step"
    python3 "$WORK/steps.py" "$WORK/$row.txt" "$WORK/$row.steps" "$row" "$4" "$5" "$6" "$7"
  fi
}

# --- topology ------------------------------------------------------------------------------------
bench_pair_netns $NA $NB $VA $VB $UA $UB

bench_header "holdfast hops bench  pings=$PINGS interval=${INTERVAL}s pin=$PIN"
bench_binary

# --- holdfast -------------------------------------------------------------------------------------
provision_gateway "$BIN" "$WORK" $UB:$PORT
provision_client "$BIN" "$WORK" default default
bench_launch gw "${GW_CPU[@]}" ip netns exec $NB "$BIN" gateway run --dir "$WORK/gw"
bench_launch client "${CL_CPU[@]}" ip netns exec $NA "$CLIENT_BIN" run --no-tui --config "$WORK/default.toml"
for _ in $(seq 100); do ip netns exec $NA ping -q -c 1 -W 1 100.64.0.1 >/dev/null 2>&1 && break; sleep 0.1; done
ip netns exec $NA ping -q -c 1 -W 2 100.64.0.1 >/dev/null || { echo "holdfast tunnel did not come up"; tail -20 "$WORK/client.log" "$WORK/gw.log"; exit 1; }
GW_TUN=$(ip -n $NB -o link show | awk -F': ' '$2 !~ /^(lo|'$VB')/ {sub(/@.*/, "", $2); print $2; exit}')
HF_PIDS=$(pgrep -f "gateway run --dir $WORK/gw"; pgrep -f "run --no-tui --config $WORK/default.toml")
measure holdfast $NA 100.64.0.1 holdfast0 "$GW_TUN" $VA $VB $HF_PIDS

# --- boringtun --------------------------------------------------------------------------------------
if [ "${SKIP_BORINGTUN:-}" = 1 ]; then
  echo "boringtun: skipped (SKIP_BORINGTUN=1)"; exit 0
fi
BT=$TOOLS/bin/boringtun-cli
if [ ! -x "$BT" ]; then
  echo "# installing boringtun-cli into $TOOLS (once)"
  timeout 1800 cargo install --quiet --locked boringtun-cli --root "$TOOLS" >"$WORK/install.log" 2>&1 \
    || { echo "boringtun: skipped (cargo install failed)"; tail -5 "$WORK/install.log"; exit 0; }
fi
bench_pair_netns $NC $ND $VC $VD $UA $UB
wg_prepare "$WORK"
bench_launch bt-a "${CL_CPU[@]}" ip netns exec $NC "${NSX[@]}" "$BT" wga --foreground --disable-drop-privileges --threads 1
bench_launch bt-b "${GW_CPU[@]}" ip netns exec $ND "${NSX[@]}" "$BT" wgb --foreground --disable-drop-privileges --threads 1
wg_configure $NC $ND wga wgb 100.64.1 $UA $UB $PORT "$WORK" || { echo "boringtun: could not be configured"; tail -5 "$WORK/bt-a.log" "$WORK/bt-b.log"; exit 1; }
for _ in $(seq 20); do ip netns exec $NC ping -q -c 1 -W 1 100.64.1.2 >/dev/null 2>&1 && break; done
measure boringtun $NC 100.64.1.2 wga wgb $VC $VD $(pgrep -f "$BT wg[ab] --foreground")
if [ "$STEPS" = 1 ] && [ -s "$WORK/holdfast.steps" ] && [ -s "$WORK/boringtun.steps" ]; then
  echo "step by step, side by side"
  python3 "$WORK/steps.py" --side "$WORK/holdfast.steps" "$WORK/boringtun.steps"
fi

# --- both, alternating --------------------------------------------------------------------------------
# See the header: the two tunnels' plain pings in alternating blocks, for a ratio that drift does not skew.
ALT=$ALTERNATIONS
: >"$WORK/hf.rtt"; : >"$WORK/bt.rtt"
for _ in $(seq "$ALT"); do
  rtts $NA 100.64.0.1 $((PINGS / ALT)) >>"$WORK/hf.rtt"
  rtts $NC 100.64.1.2 $((PINGS / ALT)) >>"$WORK/bt.rtt"
done
hf=$(median <"$WORK/hf.rtt"); bt=$(median <"$WORK/bt.rtt")
echo "alternating ($ALT blocks, $(wc -l <"$WORK/hf.rtt") / $(wc -l <"$WORK/bt.rtt") pings): holdfast median $hf ms, boringtun $bt ms, ratio $(python3 -c "print('%.2f' % ($hf / $bt))" 2>/dev/null || echo '?')"

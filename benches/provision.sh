# Sourced by the shell benches: the binary under test, the machine header, and provisioning of a
# gateway directory and bench client files.
#
#   need COMMAND PACKAGE
#     installs the Debian PACKAGE (apt-get) unless COMMAND is on the PATH.
#   bench_header TITLE
#     prints the lines every bench starts with: what ran, when, on which CPU and how loaded.
#   bench_binary
#     sets BIN: as given in the environment, else the release build (built now); and CLIENT_BIN,
#     the client-only binary `holdfast-client` (what a client machine installs), beside BIN
#     unless given.
#   bench_pin BENCH
#     reads PIN (0 or 1; BENCH names the script in its errors) and sets the arrays GW_CPU and
#     CL_CPU, prefixes for the gateway ends and for the client ends and pings: empty, or with
#     PIN=1 `taskset -c 0` and `taskset -c 1`, as if each gateway were on another machine.
#   bench_launch LOG COMMAND...
#     runs COMMAND in the background under `timeout` (LIFE seconds), its output in WORK/LOG.log, its
#     pid added to PIDS.
#   bench_cleanup NS...
#     for the EXIT trap: stops what bench_launch started (TERM, then waits), deletes the namespaces
#     NS... and their /etc/netns files, and WORK.
#   bench_pair_netns NA NB VA VB UA UB
#     two namespaces joined by a veth pair (VA in NA with UA/24, VB in NB with UB/24), loopback up,
#     and /etc/netns/NAME/resolv.conf for each (the caller removes both on exit): the client's (NA)
#     for the client to rewrite to the gateway's resolver, the gateway's (NB) naming 198.18.0.3, an
#     unused underlay address, so that its resolver is on as in a default deployment.
#   wg_prepare WORK
#     for the userspace WireGuard anchors: two key pairs (WORK/a.key, a.pub, b.key, b.pub) and the
#     array NSX, a prefix that runs a command with a private /run bound to WORK/run, so both
#     anchors' control sockets live in WORK/run/wireguard and never in the machine's /run.
#   wg_configure NA NB IA IB NET UA UB PORT WORK
#     once both anchors (interface IA in NA, IB in NB, started under "${NSX[@]}") have their
#     control sockets (waited for, bounded), peers them with `wg` (A at UA, B at UB, port PORT)
#     and gives IA NET.1/24 and IB NET.2/24, MTU 1420, up. Non-zero if any step fails.
#   provision_gateway BIN WORK GATEWAY_ADDR:PORT
#     writes WORK/gw (IPv6 tunnel subnet fd00:b:e::/64; everything else as `gateway init` writes it).
#   provision_client BIN WORK NAME default|split
#     registers NAME and writes WORK/NAME.toml. Both kinds get `[log] dir` and `[status] socket` in
#     WORK, so a bench never writes to /var/log/holdfast or takes /run/holdfast/client.sock, which
#     another client on the machine may hold; nothing else of the data plane or the network changes.
#       default: the file exactly as `add-client` writes it otherwise: full tunnel (both families),
#                kill-switch on, DNS from the gateway. What a user runs, so the headline figure.
#       split:   a split tunnel to the gateway's tunnel addresses 100.64.0.1 and fd00:b:e::1 only,
#                no kill-switch: the data plane alone, without routing or firewall rules.
#   provision_pair BIN WORK GATEWAY_ADDR:PORT
#     both: WORK/gw and a split client file WORK/client.toml (what benches/flood.sh uses).
need() { command -v "$1" >/dev/null || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }

bench_header() {
  echo "# $1  $(date -u +%FT%TZ)"
  echo "# cpu: $(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)  nproc=$(nproc)"
  echo "# aes flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'aes|pclmulqdq|vaes|vpclmulqdq|avx2|avx512f' | tr '\n' ' ')"
  echo "# kernel: $(uname -r)   load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
}

bench_binary() {
  if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet --bin holdfast --bin holdfast-client
    BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/holdfast
  fi
  BIN=$(readlink -f "$BIN")
  CLIENT_BIN=$(readlink -f "${CLIENT_BIN:-$(dirname "$BIN")/holdfast-client}")
  [ -x "$CLIENT_BIN" ] || { echo "no client binary at $CLIENT_BIN (build it with --bin holdfast-client, or set CLIENT_BIN)" >&2; exit 2; }
}

bench_pin() {
  PIN=${PIN:-0} GW_CPU=() CL_CPU=()
  [[ $PIN =~ ^[01]$ ]] || { echo "$1: PIN must be 0 or 1, not '$PIN'" >&2; exit 2; }
  [ "$PIN" = 1 ] || return 0
  [ "$(nproc)" -ge 2 ] || { echo "$1: PIN=1 needs two CPUs" >&2; exit 2; }
  GW_CPU=(taskset -c 0) CL_CPU=(taskset -c 1)
}

bench_launch() { local log=$1; shift; timeout -k 5 "$LIFE" "$@" >"$WORK/$log.log" 2>&1 & PIDS+=($!); }

bench_cleanup() {
  set +e
  local p n
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null; done
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null; done
  for n in "$@"; do ip netns del "$n" 2>/dev/null; rm -rf "/etc/netns/$n"; done
  rmdir /etc/netns 2>/dev/null
  rm -rf "$WORK"
}

bench_pair_netns() {
  local na=$1 nb=$2 va=$3 vb=$4 ua=$5 ub=$6
  ip netns add "$na"; ip netns add "$nb"
  ip link add "$va" type veth peer name "$vb"; ip link set "$va" netns "$na"; ip link set "$vb" netns "$nb"
  ip -n "$na" addr add "$ua/24" dev "$va"; ip -n "$nb" addr add "$ub/24" dev "$vb"
  ip -n "$na" link set lo up; ip -n "$nb" link set lo up; ip -n "$na" link set "$va" up; ip -n "$nb" link set "$vb" up
  mkdir -p "/etc/netns/$na" "/etc/netns/$nb"
  echo "# holdfast bench: the client's own namespace" >"/etc/netns/$na/resolv.conf"
  echo "nameserver 198.18.0.3" >"/etc/netns/$nb/resolv.conf"
}

wg_prepare() {
  local work=$1
  mkdir -p "$work/run/wireguard"; chmod 700 "$work/run"
  (umask 077; wg genkey >"$work/a.key"; wg genkey >"$work/b.key")
  wg pubkey <"$work/a.key" >"$work/a.pub"; wg pubkey <"$work/b.key" >"$work/b.pub"
  NSX=(unshare -m --propagation private sh -c 'mount --bind "$0" /run && exec "$@"' "$work/run")
}

wg_configure() {
  local na=$1 nb=$2 ia=$3 ib=$4 net=$5 ua=$6 ub=$7 port=$8 work=$9
  for _ in $(seq 100); do [ -S "$work/run/wireguard/$ia.sock" ] && [ -S "$work/run/wireguard/$ib.sock" ] && break; sleep 0.1; done
  ip netns exec "$na" "${NSX[@]}" wg set "$ia" private-key "$work/a.key" listen-port "$port" \
      peer "$(cat "$work/b.pub")" allowed-ips "$net.2/32" endpoint "$ub:$port" \
    && ip netns exec "$nb" "${NSX[@]}" wg set "$ib" private-key "$work/b.key" listen-port "$port" \
      peer "$(cat "$work/a.pub")" allowed-ips "$net.1/32" endpoint "$ua:$port" \
    && ip -n "$na" addr add "$net.1/24" dev "$ia" && ip -n "$na" link set "$ia" mtu 1420 up \
    && ip -n "$nb" addr add "$net.2/24" dev "$ib" && ip -n "$nb" link set "$ib" mtu 1420 up
}

provision_gateway() {
  local bin=$1 work=$2 endpoint=$3
  "$bin" gateway init --dir "$work/gw" --endpoint "$endpoint" --subnet6 fd00:b:e::/64 >/dev/null
}

provision_client() {
  local bin=$1 work=$2 name=$3 kind=$4 out=$2/$3.toml
  case $kind in default|split) ;; *) echo "provision_client: kind must be default or split, not '$kind'" >&2; return 2;; esac
  "$bin" gateway add-client --dir "$work/gw" "$name" --out "$out" >/dev/null
  python3 - "$out" "$work/logs-$name" "$work/$name.sock" "$kind" <<'PY'
import sys
path, logs, sock, kind = sys.argv[1:]
text = open(path).read()
def section(text, name, body):
    # add-client writes an empty [name] table for each section: fill it, or append one.
    head = '[%s]\n' % name
    return text.replace(head, head + body, 1) if head in text else text + '\n' + head + body
if kind == 'split':
    text = section(text, 'network', 'routes = ["100.64.0.1/32", "fd00:b:e::1/128"]\nkillswitch = false\n')
text = section(text, 'log', 'dir = "%s"\n' % logs)
text = section(text, 'status', 'socket = "%s"\n' % sock)
open(path, 'w').write(text)
PY
}

provision_pair() {
  local bin=$1 work=$2 endpoint=$3
  provision_gateway "$bin" "$work" "$endpoint"
  provision_client "$bin" "$work" client split
}

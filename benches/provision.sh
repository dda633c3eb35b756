# Sourced by the shell benches: provisions a gateway directory and one bench client file.
#   provision_pair BIN WORK GATEWAY_ADDR:PORT
# writes WORK/gw (the gateway, IPv6 tunnel subnet fd00:b:e::/64) and WORK/client.toml (split
# tunnel to the gateway's tunnel addresses 100.64.0.1 and fd00:b:e::1 only, no
# kill-switch, logs in WORK/logs): the benches measure the data plane, not routing.
provision_pair() {
  local bin=$1 work=$2 endpoint=$3
  "$bin" gateway init --dir "$work/gw" --endpoint "$endpoint" --subnet6 fd00:b:e::/64 >/dev/null
  "$bin" gateway add-client --dir "$work/gw" bench --out "$work/client.toml" >/dev/null
  python3 - "$work/client.toml" "$work/logs" <<'PY'
import sys
path, logs = sys.argv[1], sys.argv[2]
text = open(path).read()
def section(text, name, body):
    # add-client may already write an empty [name] table: fill it, or append one.
    head = '[%s]\n' % name
    return text.replace(head, head + body, 1) if head in text else text + '\n' + head + body
text = section(text, 'network', 'routes = ["100.64.0.1/32", "fd00:b:e::1/128"]\nkillswitch = false\n')
text = section(text, 'log', 'dir = "%s"\n' % logs)
open(path, 'w').write(text)
PY
}

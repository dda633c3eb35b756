#!/usr/bin/env python3
"""Bounded UDP flood for benches/flood.sh: sends datagrams to DEST until COUNT are sent or SECS
have passed, whichever comes first, then prints how many went out and the rate.

  sender.py KIND DEST_IP DEST_PORT SECS COUNT [SESSION_ID_HEX]

KIND: junk     random bytes, random lengths 20..200 (what a port scanner or a DoS tool sends)
      headers  a well-formed Holdfast Data header (version 1, type 1, reserved 0) with a random
               session id and counter, then random bytes: passes any stateless filter
      forged   as headers, but every datagram names SESSION_ID_HEX (a live session): bad tags
               for a session the gateway knows, which cost it an AES-GCM open each
The datagrams are generated once (a pool of 4096), so the loop is one sendto per datagram.
"""
import os, random, signal, socket, sys, time

# The bench stops a flood with SIGTERM: end through `finally`, so the count is still printed.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

kind, ip, port, secs, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
sid = bytes.fromhex(sys.argv[6]) if len(sys.argv) > 6 else None
assert secs <= 600 and count <= 500_000_000, "bounded in time and count"
rng = random.Random(42)
pool = []
for _ in range(4096):
    if kind == "junk":
        d = os.urandom(rng.randint(20, 200))
    else:
        session = sid if kind == "forged" else os.urandom(8)
        d = bytes([0x11, 0, 0, 0]) + session + os.urandom(8) + os.urandom(rng.randint(16, 180))
    pool.append(d)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dest = (ip, port)
sent, start = 0, time.monotonic()
end = start + secs
send = s.sendto
try:
    while sent < count:
        for d in pool:
            try:
                send(d, dest)
            except OSError:
                pass  # ENOBUFS / ECONNREFUSED (ICMP from a closed port): keep going
        sent += len(pool)
        if time.monotonic() >= end:
            break
finally:
    took = time.monotonic() - start
    print("%s: %d datagrams in %.1f s (%.0f/s)" % (kind, sent, took, sent / max(took, 1e-9)), flush=True)

#!/usr/bin/env python3
"""Creates N carts (default 1000) and writes their ids, one per line, to FILE (for cart_ops.lua).

Usage: setup_carts.py http://HOST:PORT FILE [N]
"""
import http.client
import json
import sys

TARGET, OUT = sys.argv[1], sys.argv[2]
COUNT = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
HOST, PORT = TARGET.split("://")[-1].rstrip("/").rsplit(":", 1)
conn = http.client.HTTPConnection(HOST, int(PORT))
ids = []
for _ in range(COUNT):
    conn.request("POST", "/v1/carts")
    response = conn.getresponse()
    body = response.read()
    if response.status != 201:
        raise SystemExit(f"POST /v1/carts: {response.status} {body[:200]!r}")
    ids.append(json.loads(body)["cart_id"])
with open(OUT, "w") as f:
    f.write("\n".join(ids) + "\n")
print(f"{COUNT} carts ready")

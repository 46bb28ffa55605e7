#!/usr/bin/env python3
"""Creates the products the wrk scenarios use: SOLDOUT (stock 0), HOT and S0..S9999 (large stock).

Usage: setup_products.py HOST:PORT
"""
import http.client
import json
import sys
import threading

ADDR = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8080"
HOST, PORT = ADDR.rsplit(":", 1)


def put(conn, sku, stock):
    body = json.dumps({"name": sku, "price_cents": 1999, "currency": "EUR", "stock": stock})
    conn.request("PUT", f"/v1/products/{sku}", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"PUT {sku}: {response.status}")


def worker(first, step):
    conn = http.client.HTTPConnection(HOST, int(PORT))
    for i in range(first, 10_000, step):
        put(conn, f"S{i}", 10_000_000)


conn = http.client.HTTPConnection(HOST, int(PORT))
put(conn, "SOLDOUT", 0)
put(conn, "HOT", 100_000_000)
threads = [threading.Thread(target=worker, args=(t, 16)) for t in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("products ready: SOLDOUT (stock 0), HOT, S0..S9999")

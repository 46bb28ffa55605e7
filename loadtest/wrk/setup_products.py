#!/usr/bin/env python3
"""Creates the products the wrk scenarios use: SOLDOUT (stock 0), HOT and S0..S9999 (large stock).

Usage: setup_products.py [http://|https://]HOST:PORT
(https: the certificate is not verified, as wrk does not verify it: run.sh's is self-signed)
"""
import http.client
import json
import ssl
import sys
import threading

TARGET = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8080"
SCHEME, _, ADDR = TARGET.rpartition("://")
HOST, PORT = ADDR.rstrip("/").rsplit(":", 1)
if SCHEME not in ("", "http", "https"):
    raise SystemExit(f"{TARGET}: use http://, https:// or HOST:PORT")


def connect():
    if SCHEME == "https":
        return http.client.HTTPSConnection(HOST, int(PORT), context=ssl._create_unverified_context())
    return http.client.HTTPConnection(HOST, int(PORT))


def put(conn, sku, stock):
    body = json.dumps({"name": sku, "price_cents": 1999, "currency": "EUR", "stock": stock})
    conn.request("PUT", f"/v1/products/{sku}", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"PUT {sku}: {response.status}")


def worker(first, step):
    conn = connect()
    for i in range(first, 10_000, step):
        put(conn, f"S{i}", 10_000_000)


conn = connect()
put(conn, "SOLDOUT", 0)
put(conn, "HOT", 100_000_000)
threads = [threading.Thread(target=worker, args=(t, 16)) for t in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("products ready: SOLDOUT (stock 0), HOT, S0..S9999")

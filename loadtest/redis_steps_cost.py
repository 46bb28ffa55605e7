#!/usr/bin/env python3
"""What Redis spends per checkout on the `STEPS` script, by batch size, without the server.

Sends the script (read from src/sessions/redis/scripts.rs, as the server loads it) the way a
busy core's queue does in steady state: each call carries BATCH checkouts' starts and the ends of
the previous call's checkouts (each end storing a ~330-byte answer). For each batch size it
resets Redis's `INFO commandstats` and prints, per checkout: the time Redis spent inside
`EVALSHA` (the whole script), inside the `SET` and `GET` commands the scripts ran, and Redis's
process CPU (`INFO cpu`, user + system, which also counts the socket work). What `EVALSHA` costs
beyond its commands is the Lua around them; what a call costs beyond its steps shows in the
difference between batch sizes. Keys are under a prefix of the run's own and deleted afterwards.
Bounded: CHECKOUTS per batch size (default 60,000).

Usage: [REDIS_URL=redis://127.0.0.1:6379] loadtest/redis_steps_cost.py [BATCH ...]
       (default batch sizes: 1 5 30 100; CHECKOUTS=n to change the count)
"""
import os
import random
import re
import socket
import sys
import urllib.parse

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
URL = urllib.parse.urlparse(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
CHECKOUTS = int(os.environ.get("CHECKOUTS", "60000"))
ANSWER = (
    "201 1765000000000 0123456789abcdef\n"
    '{"order_id":"ord_0123456789abcdef01234567","status":"paid","customer_id":"c",'
    '"items":[{"sku":"S1234","quantity":1,"unit_price_cents":1999}],"total_cents":1999,'
    '"currency":"EUR","created_at":"2026-12-06T20:00:00.000Z"}'
)


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        arg = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class Redis:
    def __init__(self):
        try:
            self.sock = socket.create_connection((URL.hostname or "127.0.0.1", URL.port or 6379), timeout=30)
        except OSError as error:
            raise SystemExit(f"Redis does not answer at {URL.geturl()}: {error}")
        self.file = self.sock.makefile("rb")

    def read(self):
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"-":
            raise SystemExit(f"Redis: {rest.decode()}")
        if kind in (b"+", b":"):
            return rest
        if kind == b"$":
            length = int(rest)
            return None if length < 0 else self.file.read(length + 2)[:-2]
        if kind == b"*":
            return [self.read() for _ in range(max(int(rest), 0))]
        raise SystemExit(f"Redis: unexpected reply {line!r}")

    def call(self, *args):
        self.sock.sendall(encode(*args))
        return self.read()

    def info(self, section):
        text = self.call("INFO", section).decode()
        return dict(line.split(":", 1) for line in text.split("\r\n") if ":" in line)


def steps_script():
    source = open(os.path.join(ROOT, "src/sessions/redis/scripts.rs")).read()
    found = re.search(r'pub\(super\) const STEPS: &str = r"(.*?)";', source, re.S)
    if not found:
        raise SystemExit("STEPS not found in src/sessions/redis/scripts.rs")
    return found.group(1)


def main():
    batches = [int(b) for b in sys.argv[1:]] or [1, 5, 30, 100]
    redis = Redis()
    sha = redis.call("SCRIPT", "LOAD", steps_script()).decode()
    prefix = f"bench:steps:{os.getpid()}:{random.randrange(10**9)}:key:"
    print(f"Redis {redis.info('server').get('redis_version', '?')} at {URL.geturl()}; {CHECKOUTS} checkouts per batch size")
    print("batch | EVALSHA µs/checkout | SET + GET µs/checkout | Redis CPU µs/checkout")
    try:
        for batch in batches:
            redis.call("CONFIG", "RESETSTAT")
            cpu = redis.info("cpu")
            before = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
            calls = max(CHECKOUTS // batch, 1)
            ends = []
            for call in range(calls):
                keys, args = [], ["30000"]
                starts = [(f"{prefix}{batch}:{call}:{i}", f"~bench/1/{call * batch + i}/") for i in range(batch)]
                for key, value in starts:
                    keys.append(key)
                    args.append("s" + value)
                for key, value in ends:
                    keys.append(key)
                    args += ["e" + value, ANSWER, "86400000"]
                redis.call("EVALSHA", sha, len(keys), *keys, *args)
                ends = starts
            cpu = redis.info("cpu")
            spent = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]) - before
            stats = redis.info("commandstats")
            usec = lambda name: float(dict(p.split("=") for p in stats.get(f"cmdstat_{name}", "usec=0").split(","))["usec"])
            checkouts = calls * batch
            print(f"{batch:5} | {usec('evalsha') / checkouts:19.2f} | {(usec('set') + usec('get')) / checkouts:21.2f} | {spent * 1e6 / checkouts:21.2f}")
    finally:
        cursor = b"0"
        while True:
            cursor, keys = redis.call("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
            if keys:
                redis.call("DEL", *keys)
            if cursor == b"0":
                break


if __name__ == "__main__":
    main()

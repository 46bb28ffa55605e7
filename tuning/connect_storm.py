#!/usr/bin/env python3
"""A connection storm: N clients connect at once and each sends one `GET /healthz` on its own
connection, all connections held open until every client is answered or TIMEOUT seconds pass.

Prints how many were answered, each one's time from its own start of connecting to its answer
(p50, p99, max),
how many took a second or more (a SYN or an ACK dropped by a full queue costs the client a
retransmission: 1 s for a SYN, 200 ms and up for the handshake's last ACK), and the errors by kind.
Bounded: N connections, TIMEOUT seconds, to 127.0.0.1 only.

Usage: connect_storm.py HOST:PORT N [TIMEOUT_SECONDS]
"""
import asyncio
import collections
import sys
import time

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: storm\r\n\r\n"


async def one(host, port, done, held):
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as error:
        return ("connect: " + (error.strerror or type(error).__name__), None)
    held.append(writer)
    try:
        writer.write(REQUEST)
        await writer.drain()
        line = await reader.readline()
        if not line.startswith(b"HTTP/1.1 200"):
            return ("answer: " + line.decode(errors="replace").strip()[:40], None)
        return (None, time.monotonic() - started)
    except OSError as error:
        return ("request: " + (error.strerror or type(error).__name__), None)
    finally:
        done.append(1)


async def storm(host, port, n, timeout):
    done, held = [], []
    tasks = [asyncio.create_task(one(host, port, done, held)) for _ in range(n)]
    finished, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    for writer in held:
        writer.close()
    results = [task.result() for task in finished]
    times = sorted(t for error, t in results if error is None)
    errors = collections.Counter(error for error, _ in results if error is not None)
    if pending:
        errors[f"no answer within {timeout:g} s"] += len(pending)
    return times, errors


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    host, port = sys.argv[1].rsplit(":", 1)
    if host not in ("127.0.0.1", "localhost"):
        sys.exit("connect_storm.py sends load to 127.0.0.1 only")
    n = int(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    times, errors = asyncio.run(storm(host, int(port), n, timeout))

    def at(q):
        return times[min(len(times) - 1, int(q * len(times)))] * 1000 if times else float("nan")

    slow = sum(1 for t in times if t >= 1.0)
    print(
        f"answered {len(times)}/{n}; p50 {at(0.5):.0f} ms, p99 {at(0.99):.0f} ms, "
        f"max {at(1.0):.0f} ms; {slow} took >= 1 s"
        + ("; errors: " + ", ".join(f"{k} x{v}" for k, v in errors.most_common()) if errors else "")
    )


if __name__ == "__main__":
    main()

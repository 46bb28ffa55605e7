"""Holds COUNT live stock streams (GET /v1/products/SKU/stream) open on a server for at most
SECONDS, reading whatever they send; prints `holding COUNT streams` once every one has its first
event, then waits. Bounded: opens COUNT connections (in batches of 500), then stops after SECONDS
or on SIGTERM, closing them all. Only for 127.0.0.1.

Usage: python3 loadtest/wrk/hold_streams.py URL SKU COUNT SECONDS
"""

import asyncio
import signal
import sys
import urllib.parse


async def hold(host, port, sku, opened, stop):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET /v1/products/{sku}/stream HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the stream was refused: {head[:60]!r}")
    await reader.readuntil(b"\n\n")  # the first event (inside the first chunk)
    opened.append(1)
    reading = asyncio.ensure_future(reader.read(65536))
    while not stop.is_set():
        done, _ = await asyncio.wait({reading}, timeout=1)
        if done:
            if not reading.result():
                break
            reading = asyncio.ensure_future(reader.read(65536))
    reading.cancel()
    writer.close()


async def main():
    url, sku, count, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    parsed = urllib.parse.urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost"):
        sys.exit("only 127.0.0.1")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    opened = []
    tasks = []
    for start in range(0, count, 500):
        batch = [
            asyncio.ensure_future(hold(parsed.hostname, parsed.port, sku, opened, stop))
            for _ in range(start, min(count, start + 500))
        ]
        tasks.extend(batch)
        while len(opened) < min(count, start + 500):
            failed = [t for t in tasks if t.done() and t.exception()]
            if failed:
                raise failed[0].exception()
            await asyncio.sleep(0.05)
    print(f"holding {len(opened)} streams", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)


asyncio.run(main())

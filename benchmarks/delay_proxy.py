"""A TCP proxy on 127.0.0.1 that delays every chunk by half a round trip in each direction: a wide-area link's
latency, where the kernel has no `tc netem` (this one has none). Throughput is not limited (shape that with `tc
tbf`); order is kept; the delay is added once per direction, so a request and its reply cost one round trip.

    python benchmarks/delay_proxy.py --listen 7001 --to 7000 --rtt 50 --lifetime 600

Each chunk read from one side is stamped with `arrival + rtt / 2` and written to the other side at that time, in
order, by one writer per direction. It listens and connects on 127.0.0.1 only, and exits after `--lifetime` seconds
whatever happens (a benchmark's proxy never outlives it).
"""

import argparse
import asyncio
import contextlib
import time


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copies `reader` to `writer`, each chunk `delay` seconds after it was read (a reader and a writer task, so
    that reading never waits for the delay: the link stays full)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def read() -> None:
        while chunk := await reader.read(2**16):
            queue.put_nowait((time.monotonic() + delay, chunk))
        queue.put_nowait((time.monotonic() + delay, b""))

    async def write() -> None:
        while True:
            due, chunk = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not chunk:
                break
            writer.write(chunk)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    await asyncio.gather(read(), write())


async def _serve(listen: int, target: int, rtt_ms: float) -> asyncio.Server:
    delay = rtt_ms / 2000

    async def connection(client_reader, client_writer) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(_pipe(client_reader, server_writer, delay), _pipe(server_reader, client_writer, delay))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (client_writer, server_writer):
                writer.close()

    return await asyncio.start_server(connection, "127.0.0.1", listen)


async def _main(listen: int, target: int, rtt_ms: float, lifetime: float) -> None:
    server = await _serve(listen, target, rtt_ms)
    async with server:
        await asyncio.sleep(lifetime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=int, required=True, help="Port on 127.0.0.1 the client dials.")
    parser.add_argument("--to", type=int, required=True, help="Port on 127.0.0.1 the server listens on.")
    parser.add_argument("--rtt", type=float, required=True, help="Round trip added, in ms (half each way).")
    parser.add_argument("--lifetime", type=float, default=3600, help="Seconds after which the proxy exits.")
    args = parser.parse_args()
    if not 0 <= args.rtt <= 10_000:
        raise SystemExit(f"--rtt {args.rtt} is out of range: 0 .. 10000 ms.")
    asyncio.run(_main(args.listen, args.to, args.rtt, args.lifetime))


if __name__ == "__main__":
    main()

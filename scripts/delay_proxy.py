"""A TCP relay that delays every byte by a fixed time in each direction: a slow link for tests and experiments.

Where the kernel has tc's netem, that is the better tool; this stands in for it on kernels built without it.
Data keeps its order and the link is not slowed down otherwise (a chunk read at t is written at t + delay).

    python scripts/delay_proxy.py --listen 10.0.0.2:7000 --target 127.0.0.1:7001 --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

logger = logging.getLogger("delay_proxy")
CHUNK_BYTES = 1 << 16


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()):  # isdigit alone accepts superscripts
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def pump() -> None:
        try:
            while data := await reader.read(CHUNK_BYTES):
                queue.put_nowait((loop.time() + delay, data))
        except ConnectionError:
            pass
        queue.put_nowait((loop.time() + delay, b""))  # end of stream, delayed like the data

    pumping = asyncio.create_task(pump())
    try:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        pumping.cancel()
        with contextlib.suppress(Exception):
            writer.close()


async def serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError as e:
            logger.warning(f"cannot reach {target}: {e}")
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer, delay), _pipe(up_reader, writer, delay))

    server = await asyncio.start_server(handle, *listen)
    logger.info(f"relaying {listen} -> {target} with {delay * 1000:.0f} ms each way")
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=_host_port, required=True, help="HOST:PORT to accept connections on")
    parser.add_argument("--target", type=_host_port, required=True, help="HOST:PORT to relay them to")
    parser.add_argument("--delay-ms", type=float, required=True, help="added delay in each direction")
    args = parser.parse_args()
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.target, args.delay_ms / 1000))


if __name__ == "__main__":
    main()

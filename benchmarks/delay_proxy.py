"""Internet-like links on loopback: a TCP proxy that adds one-way delay and a bandwidth cap (no netem here).

Every chunk read from one side is scheduled for delivery at `arrival + delay` (after the bandwidth
cap let it leave), in order, by a writer task: the delay is a pipeline delay, so throughput is never
capped by it, only by the bandwidth cap (a token bucket). Bytes are counted per direction, so a
benchmark can prove its traffic really went through the proxy.

A peer goes behind a proxy by listening on a fixed real port and announcing the proxy's address
(`--port Q --announce-maddrs /ip4/127.0.0.1/tcp/P`); see `start_proxied_peer`.

    python -m benchmarks.delay_proxy run --target-port Q --listen-port P --delay-ms 25 --bandwidth-mbps 100
    python -m benchmarks.delay_proxy check      # measures a proxy: delay, pipelining, bandwidth cap
"""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Optional

import typer

from benchmarks.common import console, table

CHUNK = 65536
QUEUE_CHUNKS = 256  # per direction: beyond this the proxy stops reading, and TCP pushes back on the sender
app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


class Shaper:
    """One direction of a link: a token bucket (rate, burst), then a fixed one-way delay.

    `schedule(n)` returns when n bytes that arrive now are delivered. A link with no burst would finish
    sending them at `virtual = max(now, virtual) + n / rate`; the bucket lets them leave up to
    `burst / rate` earlier. Deliveries never go back in time, so order is kept.
    """

    def __init__(self, delay: float, rate: float | None, burst: int):
        self.delay, self.rate, self.burst = delay, rate, burst
        self.virtual = 0.0
        self.bytes = 0

    def schedule(self, now: float, n: int) -> float:
        if not self.rate:
            return now + self.delay
        self.virtual = max(now, self.virtual) + n / self.rate
        return max(now, self.virtual - self.burst / self.rate) + self.delay


class DelayProxy:
    """Forwards every connection on `host`:`port` to 127.0.0.1:`target_port`, through one Shaper per
    direction shared by all connections (it models the target's link, not one stream)."""

    def __init__(self, target_port: int, delay_ms: float = 0.0, bandwidth_mbps: float | None = None,
                 burst_kib: float = 16, port: int = 0, host: str = "127.0.0.1"):
        self.target_port, self.port, self.host = target_port, port, host
        rate = bandwidth_mbps * 1e6 / 8 if bandwidth_mbps else None
        self.up = Shaper(delay_ms / 1000, rate, int(burst_kib * 1024))  # to the target
        self.down = Shaper(delay_ms / 1000, rate, int(burst_kib * 1024))  # back from it
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None

    def set_link(self, delay_ms: float, bandwidth_mbps: float | None = None) -> None:
        """Change the link for chunks that arrive from now on (existing connections included)."""
        rate = bandwidth_mbps * 1e6 / 8 if bandwidth_mbps else None
        for shaper in (self.up, self.down):
            shaper.delay, shaper.rate = delay_ms / 1000, rate

    @property
    def bytes_up(self) -> int:
        return self.up.bytes

    @property
    def bytes_down(self) -> int:
        return self.down.bytes

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        self.connections += 1
        await asyncio.gather(
            _pipe(client_reader, target_writer, self.up),
            _pipe(target_reader, client_writer, self.down),
            return_exceptions=True,
        )
        for writer in (client_writer, target_writer):
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shaper: Shaper) -> None:
    """Read as chunks arrive; a separate task delivers each one at its scheduled time, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)

    async def deliver() -> None:
        while (item := await queue.get()) is not None:
            due, data = item
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            shaper.bytes += len(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    sender = asyncio.create_task(deliver())
    try:
        while data := await reader.read(CHUNK):
            await queue.put((shaper.schedule(loop.time(), len(data)), data))
    except (ConnectionError, OSError):
        pass
    finally:
        await queue.put(None)
        try:
            await sender
        except (ConnectionError, OSError):
            pass


class ProxyHost:
    """Proxies on their own event loop thread, so a benchmark's client loop neither runs nor waits on them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.proxies: list[DelayProxy] = []
        threading.Thread(target=self.loop.run_forever, name="delay-proxies", daemon=True).start()

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def add(self, target_port: int, delay_ms: float = 0.0, bandwidth_mbps: float | None = None) -> DelayProxy:
        proxy = DelayProxy(target_port, delay_ms, bandwidth_mbps)
        self.run(proxy.start())
        self.proxies.append(proxy)
        return proxy

    def set_link(self, delay_ms: float, bandwidth_mbps: float | None = None) -> None:
        for proxy in self.proxies:
            self.loop.call_soon_threadsafe(proxy.set_link, delay_ms, bandwidth_mbps)

    def bytes(self) -> list[tuple[int, int]]:
        """(to the peer, from the peer) per proxy, in the order they were added."""
        return [(p.bytes_up, p.bytes_down) for p in self.proxies]

    def close(self) -> None:
        for proxy in self.proxies:
            self.run(proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


def start_proxied_peer(host: ProxyHost, args: list[str], log_dir: Path, name: str, initial_peers: list[str],
                       delay_ms: float = 0.0, bandwidth_mbps: float | None = None):
    """A swarm-serve process that others can reach only through a new proxy: it listens on a real port
    but announces the proxy's. Returns (PeerProcess, DelayProxy)."""
    from swarm.local_swarm import free_port, start_peer

    real_port = free_port()
    proxy = host.add(real_port, delay_ms, bandwidth_mbps)
    join = [a for m in initial_peers for a in ("--initial-peers", m)]
    peer = start_peer([*join, "--port", str(real_port), "--announce-maddrs", f"/ip4/127.0.0.1/tcp/{proxy.port}", *args],
                      log_dir, name)
    wrong = [m for m in peer.maddrs if f"/tcp/{proxy.port}/" not in m]
    if wrong:
        peer.stop()
        raise RuntimeError(f"peer {name} announces {wrong}, not only its proxy's port {proxy.port}")
    return peer, proxy


@app.command()
def run(
    target_port: int = typer.Option(..., help="Port of the real server on 127.0.0.1."),
    listen_port: int = typer.Option(0, help="Port to listen on (0: any; printed)."),
    listen_host: str = typer.Option("127.0.0.1", help="Address to listen on (a rig host's, in its namespace)."),
    delay_ms: float = typer.Option(0.0, help="One-way delay added in each direction, milliseconds."),
    bandwidth_mbps: Optional[float] = typer.Option(None, help="Cap per direction, megabits per second."),
    burst_kib: float = typer.Option(16, help="Token bucket depth, KiB."),
) -> None:
    """Run one proxy until Ctrl-C, printing the bytes forwarded each way every 5 s."""

    async def main() -> None:
        proxy = DelayProxy(target_port, delay_ms, bandwidth_mbps, burst_kib, listen_port, listen_host)
        console.print(f"{listen_host}:{await proxy.start()} -> 127.0.0.1:{target_port}, {delay_ms:g} ms one way, "
                      f"{bandwidth_mbps or 'unlimited'} Mbit/s")
        while True:
            await asyncio.sleep(5)
            console.print(f"{proxy.connections} connections, {proxy.bytes_up} bytes up, {proxy.bytes_down} bytes down")

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


@app.command()
def check(
    delay_ms: float = typer.Option(25.0, help="One-way delay to test."),
    bandwidth_mbps: float = typer.Option(200.0, help="Cap to test."),
    megabytes: float = typer.Option(8.0, help="Size of the bulk transfer."),
) -> None:
    """Measure a proxy in front of an echo server: round trip ≈ 2 × delay; an uncapped bulk transfer is not
    limited to one chunk per delay (pipelining); a capped one runs at the cap."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def bulk(port: int, size: int) -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.perf_counter()

        async def send() -> None:
            block = b"x" * CHUNK
            for _ in range(size // CHUNK):
                writer.write(block)
                await writer.drain()

        sending = asyncio.create_task(send())
        received = 0
        while received < size // CHUNK * CHUNK:
            received += len(await reader.read(1 << 20))
        await sending
        writer.close()
        return time.perf_counter() - started

    async def main() -> list[list]:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        target = server.sockets[0].getsockname()[1]
        rows = []
        plain = DelayProxy(target, delay_ms)
        reader, writer = await asyncio.open_connection("127.0.0.1", await plain.start())
        rtts = []
        for _ in range(10):
            started = time.perf_counter()
            writer.write(b"ping")
            await writer.drain()
            await reader.readexactly(4)
            rtts.append(time.perf_counter() - started)
        writer.close()
        rows.append(["round trip, 4 bytes", f"{2 * delay_ms:g} ms", f"{sorted(rtts)[5] * 1000:.1f} ms"])
        size = int(megabytes * 2**20)
        seconds = await bulk(plain.port, size)
        serial = size / CHUNK * delay_ms / 1000
        rows.append([f"echo {megabytes:g} MiB, no cap", f"≪ {serial:.1f} s (one chunk per delay)", f"{seconds:.2f} s"])
        capped = DelayProxy(target, delay_ms, bandwidth_mbps)
        seconds = await bulk(await capped.start(), size)
        rows.append([f"echo {megabytes:g} MiB, {bandwidth_mbps:g} Mbit/s cap",
                     f"{size * 8 / bandwidth_mbps / 1e6 + 2 * delay_ms / 1000:.2f} s",
                     f"{seconds:.2f} s ({size * 8 / (seconds - 2 * delay_ms / 1000) / 1e6:.0f} Mbit/s)"])
        rows.append(["bytes counted up / down", f"{size} each", f"{capped.bytes_up} / {capped.bytes_down}"])
        await asyncio.sleep(2 * delay_ms / 1000 + 0.2)  # let the closed connections drain through the delay
        for s in (plain, capped):
            await s.close()
        server.close()
        return rows

    rows = asyncio.run(main())
    console.print(table(f"delay proxy check: {delay_ms:g} ms one way", ["what", "expected", "measured"], rows))


if __name__ == "__main__":
    app()

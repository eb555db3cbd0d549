"""One peer's life: join the DHT, pick and load blocks, announce, serve, and leave cleanly."""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from rich.progress import Progress

from peer.announcer import Announcer
from peer.cores import RECHECK_SECONDS, CoreShare
from peer.device import check_device, free_memory
from peer.memory import Footprint, MemoryPlan, plan_memory, release_freed_memory
from peer.load import PeerLoad
from peer.metrics import PeerMetrics, serve_metrics
from peer.placement import Coverage, best_start, should_move
from peer.precision import choose_dtype
from peer.push import Pusher
from peer.reachability import MAX_RELAYS, Reach, check_reachability, serve_checks
from peer.relay import RelayLimits, RelayService, keep_connected
from peer.rpc import PeerService
from peer.scheduler import StepScheduler
from peer.sessions import SessionRegistry
from peer.settings import PeerSettings
from peer.throughput import measure_throughput, throughput_key
from swarm.dht import SwarmDHT
from swarm.dtypes import DTypeName
from swarm.errors import SwarmError
from swarm.families import family_of
from swarm.membership import SwarmKey
from swarm.records import PeerState
from swarm.reference import ResolvedModel, resolve_model
from swarm.quantized import check_quantizable
from swarm.span import Span
from swarm.weights import check_span

logger = logging.getLogger("swarm-serve")
RELAY_KEEPALIVE = 10.0  # seconds between calls that keep a peer behind NAT connected to its relays


class LoadStopped(Exception):
    """A stop signal came while blocks were loading: loading ends after the current block."""


class Peer:
    dtype: DTypeName  # measured in run() when --dtype is not given: it depends on the model

    def __init__(self, settings: PeerSettings):
        self.settings = settings
        self.cores: CoreShare | None = None
        if settings.torch_threads is None:  # a share of the host's cores, followed as other peers come and go
            self.cores = CoreShare()
            self.threads = self.cores.threads()
        else:
            self.threads = settings.torch_threads
        self.compute = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="compute", initializer=torch.set_num_threads, initargs=(self.threads,)
        )
        # one thread: its tensor work (casts, quantizing) must not take the cores from the compute thread
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load", initializer=torch.set_num_threads,
                                         initargs=(1,))
        self.device = check_device(settings.device)
        self.metrics = PeerMetrics()
        self.stopping = asyncio.Event()
        self._stop_loading = threading.Event()  # the same signal, for the compute thread while it loads blocks

    async def run(self) -> None:
        settings, loop = self.settings, asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop)
        # Only the compute thread runs torch with several threads (its own setting, above). If the event
        # loop's tensor work (checks, conversions) went parallel too, OpenMP would keep a second team
        # of threads, more than this machine's cores, and switch every team to slow sleeping waits
        # (docs/batching.md).
        torch.set_num_threads(1)
        model = await loop.run_in_executor(self.compute, resolve_model, settings.model)
        # an architecture or quantization we cannot run fails here, before the swarm ever hears of us
        with torch.device("meta"):
            check_quantizable(family_of(model.config).decoder_layer(model.config, layer_idx=0), settings.quant, self.device)
        if settings.dtype is not None:
            self.dtype = settings.dtype
        else:
            self.dtype = await loop.run_in_executor(self.compute, choose_dtype, model, self.device, settings.quant)
        exporter = None if settings.metrics_port is None else await self._serve_metrics()  # a taken port fails now
        dht, reach = await self._join()
        try:
            await self._serve(model, dht, reach)
        finally:
            if exporter is not None:
                exporter.close()
            try:  # bounded: a daemon killed from outside never answers
                await asyncio.wait_for(dht.shutdown(), timeout=5)
            except Exception as e:
                logger.warning(f"p2p daemon did not shut down cleanly: {e!r}")
            self.compute.shutdown(wait=False, cancel_futures=True)
            self.loader.shutdown(wait=False, cancel_futures=True)
            if self.cores is not None:
                self.cores.close()

    async def _join(self) -> tuple[SwarmDHT, Reach]:
        """Join the DHT and learn whether strangers can connect to us. A reachable peer relays for peers behind
        NAT; one behind NAT joins again as a DHT client (nobody could dial it) and is reached through the
        relays among the peers it joined through. Nobody to check us (a new swarm): taken as reachable."""
        settings = self.settings
        identity = str(settings.identity) if settings.identity else None
        swarm_key = SwarmKey.load(settings.swarm_key) if settings.swarm_key else None
        dht = await SwarmDHT.create(settings.initial_peers, host=settings.host, port=settings.port,
                                    announce_maddrs=settings.announce_maddrs, identity_path=identity, swarm_key=swarm_key,
                                    join_timeout=settings.join_timeout)
        relaying = settings.relay_streams > 0
        await serve_checks(dht.p2p, relays=relaying, swarm_key=swarm_key)
        maddrs = await dht.visible_maddrs()
        verdict = await check_reachability(dht, settings.initial_peers, maddrs)
        if verdict.reachable or verdict.reachable is None:
            how = f"checked by {verdict.checked_by[-8:]}" if verdict.checked_by else \
                "the first peer of a new swarm" if settings.new_swarm else "no peer could check it"
            if relaying:
                limits = RelayLimits(settings.relay_streams, settings.relay_time_limit, settings.relay_data_limit)
                await RelayService(dht, limits).register(dht.p2p)
            logger.info(f"reachable directly ({how})"
                        f"{f', relays for peers behind NAT ({settings.relay_streams} streams each)' if relaying else ''}")
            return dht, Reach(relays=[], maddrs=maddrs[:8])
        await dht.shutdown()
        if not verdict.relays:
            raise SwarmError(
                f"nobody can reach this peer at {', '.join(maddrs)} (behind NAT or a firewall), and none of the peers "
                "it joined through relays for others. Forward a port to it and pass --announce-maddrs "
                "/ip4/PUBLIC_IP/tcp/PORT, or join through a reachable peer that relays (--relay-streams > 0)")
        relays = verdict.relays[:MAX_RELAYS]
        dht = await SwarmDHT.create(relays, host=settings.host, port=settings.port, identity_path=identity,
                                    client_mode=True, swarm_key=swarm_key)
        relay_ids = [m.rsplit("/p2p/", 1)[1] for m in relays]
        logger.info(f"not reachable directly (behind NAT or a firewall): others reach this peer through "
                    f"{len(relay_ids)} relay(s): {', '.join(r[-8:] for r in relay_ids)}")
        return dht, Reach(relays=relay_ids, maddrs=relays)

    async def _serve(self, model: ResolvedModel, dht: SwarmDHT, reach: Reach) -> None:
        settings, loop = self.settings, asyncio.get_running_loop()
        for maddr in await dht.visible_maddrs():
            print(f"listening on {maddr}", flush=True)
        for relay in reach.maddrs if not reach.direct else []:
            print(f"reached through relay {relay}", flush=True)
        start, end = settings.span or await self._choose_span(model, dht)
        check_span(model, start, end)
        memory = self._plan_memory(model, blocks=end - start)
        sessions, load = SessionRegistry(memory.cache_tokens, self.metrics), PeerLoad()
        announcer = Announcer(dht, model, sessions, load, start, end, self.dtype, settings.quant, settings.cache_dtype,
                              settings.public_name, settings.announce_period,
                              throughput_key(model.dht_prefix, self.device, self.dtype, settings.quant, self.threads),
                              reach)
        await announcer.announce(PeerState.joining)
        logger.info(f"serving blocks {start}:{end} of {model.name} ({model.dht_prefix}) on {self.device} "
                    f"({self.threads} threads) in {self.dtype}"
                    f"{'' if settings.quant == 'none' else f' with {settings.quant} weights'}, "
                    f"KV cache {memory.cache_tokens} tokens in {settings.cache_dtype or self.dtype}")

        try:
            span = await self._load(model, start, end)
            throughput = await loop.run_in_executor(self.compute, measure_throughput, span)
        except LoadStopped:
            pass
        if self.stopping.is_set():  # Ctrl-C or SIGTERM while loading: leave without ever serving
            logger.info("stopped before serving: announcing offline")
            await _announce_offline(announcer)
            return
        scheduler = StepScheduler(self.compute, settings.max_batch_rows, settings.max_batch_tokens, settings.max_batch_wait,
                                  self.metrics, load, self.device)
        pusher = Pusher(dht, self.metrics)
        service = PeerService(span, sessions, scheduler, pusher, announcer, self.metrics, settings.session_idle_timeout,
                              dht.swarm_key)
        await service.register(dht.p2p)
        await announcer.announce(PeerState.online, throughput)
        tasks = [asyncio.create_task(announcer.run()), asyncio.create_task(self._watch_swarm(model, dht, service)),
                 asyncio.create_task(self._follow_core_share(service))]
        if not reach.direct:
            tasks.append(asyncio.create_task(keep_connected(dht, reach.relays, RELAY_KEEPALIVE)))
        print(f"ready: serving {model.name} blocks {start}:{end} as {dht.peer_id} "
              f"({throughput:.1f} block-steps/s)", flush=True)

        await self.stopping.wait()
        logger.info("shutting down: announcing offline and draining open sessions")
        sessions.accepting = False
        for task in tasks:
            task.cancel()
        await _announce_offline(announcer)
        await service.drain(settings.shutdown_grace)
        await scheduler.close()
        pusher.close()

    async def _follow_core_share(self, service: PeerService) -> None:
        """Keep the compute thread at this peer's share of the host's cores as peers start and stop beside it,
        and announce the throughput of that many threads (measured, or known from the cache)."""
        loop = asyncio.get_running_loop()
        while self.cores is not None:
            await asyncio.sleep(RECHECK_SECONDS)
            threads = self.cores.threads()
            if threads == self.threads:
                continue
            await loop.run_in_executor(self.compute, torch.set_num_threads, threads)
            logger.info(f"{self.cores.peers()} peers share this host's {self.cores.cores} cores: "
                        f"computing on {threads} threads (was {self.threads})")
            self.threads = threads
            throughput = await loop.run_in_executor(self.compute, measure_throughput, service.span)
            key = throughput_key(service.span.model.dht_prefix, self.device, self.dtype, self.settings.quant, threads)
            try:
                await service.announcer.rethreaded(throughput, key)
            except Exception as e:
                logger.warning(f"announcement failed, will retry: {e}")

    async def _serve_metrics(self) -> asyncio.Server:
        assert self.settings.metrics_port is not None
        try:
            exporter = await serve_metrics(self.metrics, self.settings.host, self.settings.metrics_port)
        except OSError as e:
            raise SwarmError(f"cannot serve metrics on {self.settings.host}:{self.settings.metrics_port}: "
                             f"{e.strerror or e}") from None
        host, port = exporter.sockets[0].getsockname()[:2]
        print(f"metrics on http://{host}:{port}/metrics", flush=True)
        return exporter

    def _stop(self) -> None:
        self.stopping.set()
        self._stop_loading.set()

    def _plan_memory(self, model: ResolvedModel, blocks: int | None = None) -> MemoryPlan:
        footprint = Footprint.of(model, self.dtype, self.settings.quant, self.settings.cache_dtype)
        return plan_memory(footprint, free_memory(self.device), self.device.type, model.num_blocks,
                           blocks, self.settings.max_cache_tokens)

    async def _choose_span(self, model: ResolvedModel, dht: SwarmDHT) -> tuple[int, int]:
        length = self.settings.num_blocks or self._plan_memory(model).blocks
        blocks = await dht.read_blocks(model.dht_prefix, model.num_blocks)
        start = best_start(Coverage.from_records(blocks, exclude=str(dht.peer_id)), length)
        return start, min(start + length, model.num_blocks)

    async def _load(self, model: ResolvedModel, start: int, end: int, serving: bool = False) -> Span:
        """The span's blocks, read one by one; raises LoadStopped soon after a stop signal.

        While the peer serves (a move), a CPU peer loads on a thread of its own, so the compute thread
        keeps running the old span's passes; a GPU's compute thread owns the device and loads itself.
        """
        with Progress(transient=True) as progress:
            task = progress.add_task(f"loading blocks {start}:{end}", total=end - start)

            def loaded(_: int) -> None:
                if self._stop_loading.is_set():
                    raise LoadStopped
                progress.advance(task)

            span = await asyncio.get_running_loop().run_in_executor(
                self.loader if serving and self.device.type == "cpu" else self.compute,
                lambda: Span(model, start, end, self.dtype, str(self.device), on_block_loaded=loaded,
                             quant=self.settings.quant, cache_dtype=self.settings.cache_dtype),
            )
        release_freed_memory()
        return span

    async def _watch_swarm(self, model: ResolvedModel, dht: SwarmDHT, service: PeerService) -> None:
        """Log who else serves the model; with automatic placement, move to uncovered or hot blocks when this
        peer only duplicates others and no session is open here. Sessions that open while the new blocks
        load keep the old span (each holds its own) until they close."""
        announcer = service.announcer
        while True:
            await asyncio.sleep(self.settings.rebalance_period)
            try:
                blocks = await dht.read_blocks(model.dht_prefix, model.num_blocks)
                coverage = Coverage.from_records(blocks, exclude=str(dht.peer_id))
                peers_seen = {pid for block in blocks for pid in block} - {str(dht.peer_id)}
                logger.info(f"swarm: {len(peers_seen)} other peers serve {model.name}; "
                            f"blocks served by nobody else: {[i for i, n in enumerate(coverage.peers) if n == 0]}")
                old_start, old_end = announcer.start, announcer.end
                new_start = should_move(coverage, old_start, old_end) if self.settings.span is None else None
                if new_start is None or service.sessions.sessions:
                    continue
                new_end = new_start + (old_end - old_start)
                reason = "fill a gap" if any(n == 0 for n in coverage.peers) else "serve hotter blocks"
                logger.info(f"moving from blocks {old_start}:{old_end} to {new_start}:{new_end} to {reason}")
                service.span = await self._load(model, new_start, new_end, serving=True)
                await announcer.move(new_start, new_end)
            except Exception as e:
                logger.warning(f"rebalancing check failed: {e!r}")


async def _announce_offline(announcer: Announcer) -> None:
    try:
        await asyncio.wait_for(announcer.announce(PeerState.offline), timeout=5)
    except Exception as e:
        logger.warning(f"could not announce offline: {e!r}")


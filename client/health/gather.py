"""Reading a swarm for swarm-health: join as a client, read the registry and block records, ping every peer."""
from __future__ import annotations

import asyncio
import time

from client.health.outputs import OutputCheck, check_outputs
from client.health.report import HealthReport, ModelTarget, build_report
from swarm.dht import SwarmDHT
from swarm.membership import SwarmKey
from swarm.errors import SwarmError
from swarm.records import ModelRegistration, PeerState

MIN_PING_TIMEOUT = 0.5  # seconds a ping gets even when the reads used up most of the budget


async def join(initial_peers: list[str], timeout: float, swarm_key: SwarmKey | None = None) -> SwarmDHT:
    """A client-only DHT node: it reads records but stores none, so checking never changes the swarm."""
    try:
        return await asyncio.wait_for(SwarmDHT.create(initial_peers, client_mode=True, swarm_key=swarm_key), timeout)
    except asyncio.TimeoutError:
        _stop_own_daemons()
        raise SwarmError(f"no answer from {', '.join(initial_peers)} within {timeout:g} s") from None


def _stop_own_daemons() -> None:
    """A p2pd whose start we cancelled has nobody left to stop it; only this process's own children are touched."""
    import psutil

    for child in psutil.Process().children():
        if child.name() == "p2pd":
            child.terminate()


async def gather(dht: SwarmDHT, refs: list[str], timeout: float, verify: bool = False) -> HealthReport:
    """Read the registry, the block records and every peer's round trip, all within `timeout` seconds; with
    `verify`, then compare the outputs of peers serving the same blocks (client/health/outputs.py)."""
    deadline = time.monotonic() + timeout
    left = lambda: max(deadline - time.monotonic(), 0.0)  # noqa: E731
    try:
        registered = await asyncio.wait_for(dht.read_models(), left())
        targets, unknown = await asyncio.wait_for(_targets(registered, refs), left())
        found = await asyncio.wait_for(
            asyncio.gather(*(dht.read_blocks(t.dht_prefix, t.num_blocks) for t in targets)), left())
    except asyncio.TimeoutError:
        raise SwarmError(f"the swarm did not answer within {timeout:g} s") from None
    tables = {t.dht_prefix: table for t, table in zip(targets, found)}
    peer_ids = sorted({p for table in found for block in table for p in block})
    ping_timeout = max(left(), MIN_PING_TIMEOUT)
    records = {p: record.announcement for table in found for block in table for p, record in block.items()}
    relays = dict(zip(peer_ids, await asyncio.gather(*(dht.relay_to(records[p], ping_timeout) for p in peer_ids))))
    ping_timeout = max(left(), MIN_PING_TIMEOUT)
    rtts = dict(zip(peer_ids, await asyncio.gather(*(dht.ping(p, ping_timeout, relays[p]) for p in peer_ids))))
    checks = OutputCheck()
    if verify:
        for table in found:
            answering = {p: r.announcement for block in table for p, r in block.items()
                         if r.announcement.state == PeerState.online and rtts.get(p) is not None}
            check = await check_outputs(dht, answering, relays, max(timeout, MIN_PING_TIMEOUT))
            checks.verdicts.update(check.verdicts)
            checks.problems += check.problems
            checks.failures += check.failures
    return build_report(targets, tables, rtts, unknown, checks.verdicts, checks.problems, checks.failures)


async def _targets(registered: list[ModelRegistration], refs: list[str]) -> tuple[list[ModelTarget], list[str]]:
    """Every registered model, or the named ones (by name, prefix or a reference resolved here), and the unknown."""
    targets = {m.dht_prefix: ModelTarget(m.name, m.dht_prefix, m.num_blocks, True) for m in registered}
    if not refs:
        return list(targets.values()), []
    from swarm.reference import resolve_model

    chosen: dict[str, ModelTarget] = {}
    unknown: list[str] = []
    for ref in refs:
        match = next((t for t in targets.values() if ref in (t.name, t.dht_prefix)), None)
        if match is None:
            try:
                model = await asyncio.to_thread(resolve_model, ref)
            except SwarmError:
                unknown.append(ref)
                continue
            match = targets.get(model.dht_prefix) or ModelTarget(model.name, model.dht_prefix, model.num_blocks, False)
        chosen[match.dht_prefix] = match
    return list(chosen.values()), unknown



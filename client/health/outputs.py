"""swarm-health --verify: peers' outputs for one input, compared with those of other peers of the same blocks.

For each run of blocks that the same peers serve (a segment), every online peer that answered the
ping computes one fixed random input through those blocks (`swarm.forward`, no session), and the
outputs are compared as a client's `verify` compares them (client/agreement.py). A peer that agrees
with no other while at least two others agree is wrong; peers that disagree with nobody to settle
it are a problem without a culprit. A peer can tell this check from a session, so passing it proves
less than a client's `verify`; failing it proves a peer computes its blocks wrong.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from client.agreement import disagreement, tolerance
from swarm import protocol
from swarm.dht import SwarmDHT
from swarm.records import BlockAnnouncement

POSITIONS = 16  # of the input: enough for attention to matter, one small message
MAX_SEGMENTS = 64  # checked per model: bounds the work a check asks of the swarm


@dataclass
class OutputCheck:
    """Per peer `agrees`, `wrong` or `unsettled` (absent where nobody else serves its blocks), what the verdicts
    mean in words (`problems`), and the peers that failed to answer the check (`failures`)."""

    verdicts: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def check_outputs(dht: SwarmDHT, records: dict[str, BlockAnnouncement], relays: dict[str, str | None],
                        timeout: float) -> OutputCheck:
    """Compare the outputs of the peers in `records` (online and answering, one model) segment by segment;
    `relays`: the relay each is called through (None: directly), as the pings found."""
    result = OutputCheck()
    widths = await asyncio.gather(*(_hidden_size(dht, p, relays[p], timeout) for p in records))
    hidden_size = max(widths, default=0)
    if not hidden_size:
        return result
    bounds = sorted({b for r in records.values() for b in (r.start, r.end)})
    segments: list[tuple[int, int, list[str]]] = []
    for start, end in zip(bounds, bounds[1:]):
        peers = sorted(p for p, r in records.items() if r.start <= start and end <= r.end)
        if segments and segments[-1][2] == peers and segments[-1][1] == start:
            segments[-1] = (segments[-1][0], end, peers)  # the same peers: one longer segment
        elif len(peers) >= 2:
            segments.append((start, end, peers))
    hidden = torch.randn(1, POSITIONS, hidden_size, generator=torch.Generator().manual_seed(0))
    for start, end, peers in segments[:MAX_SEGMENTS]:
        outputs = await asyncio.gather(*(_forward(dht, p, relays[p], start, end, hidden, timeout) for p in peers))
        answered: dict[str, torch.Tensor] = {}
        for peer_id, output in zip(peers, outputs):
            if isinstance(output, str):
                result.failures.append(f"peer {peer_id[-8:]} failed the output check of blocks {start}:{end}: {output}")
            else:
                answered[peer_id] = output
        _judge(answered, records, f"{start}:{end}", result)
    return result


def _judge(outputs: dict[str, torch.Tensor], records: dict[str, BlockAnnouncement], blocks: str,
           result: OutputCheck) -> None:
    if len(outputs) < 2:
        return
    agrees = {p: {q for q in outputs if q != p and disagreement(outputs[p], outputs[q]) <= tolerance(
        [records[p], records[q]])} for p in outputs}
    if any(agrees.values()):
        for peer_id, others in agrees.items():
            if others:
                result.verdicts.setdefault(peer_id, "agrees")
            else:
                result.verdicts[peer_id] = "wrong"
                result.problems.append(f"peer {peer_id[-8:]} computes blocks {blocks} wrong: its output differs "
                                       f"from {len(outputs) - 1} other peers', which agree with each other")
        return
    for peer_id in outputs:
        result.verdicts.setdefault(peer_id, "unsettled")
    names = ", ".join(p[-8:] for p in sorted(outputs))
    result.problems.append(f"peers {names} disagree on blocks {blocks}"
                           + (": a third peer of those blocks would settle which is wrong" if len(outputs) == 2
                              else ", no two alike"))


async def _hidden_size(dht: SwarmDHT, peer_id: str, relay: str | None, timeout: float) -> int:
    request = protocol.pack_request(protocol.InfoRequest(member=dht.member_token))
    try:
        message, _ = protocol.unpack_response(await asyncio.wait_for(dht.call(peer_id, protocol.INFO, request, relay),
                                                                     timeout))
    except Exception:
        return 0
    return message.hidden_size if isinstance(message, protocol.PeerInfo) else 0


async def _forward(dht: SwarmDHT, peer_id: str, relay: str | None, start: int, end: int, hidden: torch.Tensor,
                   timeout: float) -> torch.Tensor | str:
    """The peer's output for `hidden` through blocks [start, end), or what went wrong."""
    request = protocol.pack_request(protocol.ForwardRequest(start=start, end=end, member=dht.member_token), hidden)
    try:
        async with asyncio.timeout(timeout):
            responses = await dht.iterate(peer_id, protocol.FORWARD, request, relay)
            message, tensors = protocol.unpack_response(await anext(responses))
    except Exception as e:
        return str(e) or type(e).__name__
    if isinstance(message, protocol.ErrorReply):
        return message.message
    if len(tensors) != 1 or tensors[0].shape != hidden.shape:
        return "a malformed result"
    return tensors[0]

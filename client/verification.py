"""Caught liars: a hop's output recomputed on another peer serving the same blocks, and compared.

`spot` checks a random share of each hop's steps: a fresh session on another peer gets the hop's
whole history (merged into a few long steps), then the step, and its output is compared with the
hop's. `strict` keeps such a session per hop and feeds it every step, so that no step's output is
used before a second peer agrees. Outputs agree when, at every real position, they differ by at
most `verify_tolerance` relative to their size (client/agreement.py). A disagreement is settled by a
third peer; the one found lying is banned for the client's lifetime, and the session rebuilds its
route from the lying hop on (client/session.py), so its tokens are those honest peers give.
"""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from client.agreement import disagreement, tolerance
from client.hop_stream import HopFailed, HopStream, Probe, StepInput, merged
from client.route import Bans, Hop
from client.settings import ClientSettings
from client.swarm_view import SwarmView
from swarm.errors import ProtocolError, SwarmError

logger = logging.getLogger(__name__)


class VerificationError(SwarmError):
    """strict: a step could not be confirmed (no second peer for a hop, or peers that disagree and no third)."""


class HopOutput(NamedTuple):
    """One hop's part of one step: what went in, and what the peer answered."""

    stream: HopStream
    sent: StepInput
    output: torch.Tensor


@dataclass
class Recomputed:
    peer_id: str
    output: torch.Tensor


@dataclass
class Shadow:
    """strict: a session on a second peer for one hop's blocks, fed the hop's inputs step by step."""

    stream: HopStream
    fed: int  # steps it computed
    latest: torch.Tensor  # its output of the last of them


class Verifier:
    """One session's checks. A peer it finds lying is banned for good in the client's `Bans`, which every route honours."""

    def __init__(self, view: SwarmView, settings: ClientSettings, bans: Bans, max_length: int, probe: Probe):
        self.view, self.settings, self.bans = view, settings, bans
        self.max_length, self.probe = max_length, probe
        self.rng = random.SystemRandom()  # a peer must not predict which of its steps are checked
        self.shadows: dict[tuple[int, int], Shadow] = {}  # strict: by the hop's (start, end)

    async def first_liar(self, outputs: Sequence[HopOutput], history: dict[int, list[StepInput]],
                         batch_size: int) -> int | None:
        """Check this step's hop outputs (all of them, or a share); the index of the first found lying, or None."""
        if self.settings.verify == "off":
            return None
        chosen = [i for i in range(len(outputs))
                  if self.settings.verify == "strict" or self.rng.random() < self.settings.verify_share]
        hops = {(o.stream.hop.start, o.stream.hop.end) for o in outputs}
        for key in [k for k in self.shadows if k not in hops]:  # the route changed: these hops are gone
            self.shadows.pop(key).stream.close()
        verdicts = await asyncio.gather(*(self._lies(outputs[i], history[outputs[i].stream.hop.start], batch_size)
                                          for i in chosen))
        lying = [i for i, lies in zip(chosen, verdicts) if lies]
        if lying:  # later hops' shadows were fed this step's lie
            first = outputs[lying[0]].stream.hop
            for key in [k for k in self.shadows if k[0] > first.start]:
                self.shadows.pop(key).stream.close()
        return lying[0] if lying else None

    async def _lies(self, checked: HopOutput, inputs: list[StepInput], batch_size: int) -> bool:
        hop, strict = checked.stream.hop, self.settings.verify == "strict"
        second = await self._recompute(hop, inputs, {hop.peer_id}, batch_size, keep=strict)
        if second is None:
            if strict:
                raise VerificationError(f"strict verification: no second peer serves blocks {hop.start}:{hop.end} "
                                        "in the same quantization; use verify='spot' or add a peer")
            return False
        if disagreement(checked.output, second.output, checked.sent.mask) <= self._tolerance(hop.peer_id, second.peer_id):
            return False
        problem = f"peers {hop.peer_id[-8:]} and {second.peer_id[-8:]} disagree on blocks {hop.start}:{hop.end} and "
        third = await self._recompute(hop, inputs, {hop.peer_id, second.peer_id}, batch_size, keep=False)
        if third is None:
            problem += "no third peer serves them"
        else:
            allowed = self._tolerance(hop.peer_id, second.peer_id, third.peer_id)
            if disagreement(checked.output, third.output, checked.sent.mask) <= allowed:
                self._caught(second.peer_id, hop)
                if (shadow := self.shadows.pop((hop.start, hop.end), None)) is not None:  # the liar's session
                    shadow.stream.close()
                return False
            if disagreement(second.output, third.output, checked.sent.mask) <= allowed:
                self._caught(hop.peer_id, hop)
                return True
            problem += f"a third, {third.peer_id[-8:]}, agrees with neither"
        if strict:
            raise VerificationError(f"strict verification: {problem}")
        logger.warning(f"{problem}: the step stands unconfirmed")
        return False

    def _caught(self, peer_id: str, hop: Hop) -> None:
        self.bans.forever.add(peer_id)
        logger.warning(f"peer {peer_id} returned wrong outputs for blocks {hop.start}:{hop.end} (two other peers "
                       "agree with each other, not with it): banned for this client's lifetime")

    def _tolerance(self, *peer_ids: str) -> float:
        """The largest honest disagreement between these peers, from the precisions they announce."""
        peers = self.view.online_peers()
        return tolerance([peers[p].announcement if p in peers else None for p in peer_ids], self.settings.verify_tolerance)

    def _candidates(self, hop: Hop, exclude: set[str]) -> list[str]:
        """Other peers, not banned, that serve all of the hop's blocks and keep their weights as the hop's peer does."""
        peers, unusable = self.view.online_peers(), exclude | self.bans.active()
        own = peers.get(hop.peer_id)
        return [peer_id for peer_id, record in peers.items()
                if peer_id not in unusable
                and record.announcement.start <= hop.start and hop.end <= record.announcement.end
                and (own is None or record.announcement.quant == own.announcement.quant)]

    async def _recompute(self, hop: Hop, inputs: list[StepInput], exclude: set[str], batch_size: int,
                         keep: bool) -> Recomputed | None:
        """The latest of `inputs` through the hop's blocks on another peer, after the earlier ones; None if none can."""
        key = (hop.start, hop.end)
        if keep and key in self.shadows:
            shadow = self.shadows.pop(key)
            if shadow.stream.hop.peer_id not in exclude | self.bans.active():
                try:
                    if shadow.fed < len(inputs):  # else: it has this step already (the route was rebuilt since)
                        if shadow.fed < len(inputs) - 1:  # it missed steps (a failover replayed them elsewhere)
                            await shadow.stream.replay(merged(inputs[shadow.fed:-1]), self.settings.step_timeout,
                                                       self.probe)
                        shadow.latest, shadow.fed = await self._step(shadow.stream, inputs[-1]), len(inputs)
                    self.shadows[key] = shadow
                    return Recomputed(shadow.stream.hop.peer_id, shadow.latest)
                except (HopFailed, ProtocolError) as e:  # a second peer's refusal must not end the generation
                    logger.info(f"{e}; opening another shadow session for blocks {hop.start}:{hop.end}")
            shadow.stream.close()
        candidates = self._candidates(hop, exclude)
        self.rng.shuffle(candidates)
        for peer_id in candidates:
            stream = HopStream(Hop(peer_id, hop.start, hop.end))
            try:
                await stream.open(self.view, self.max_length, batch_size, self.settings.connect_timeout)
                await stream.replay(merged(inputs[:-1]), self.settings.step_timeout, self.probe)
                output = await self._step(stream, inputs[-1])
            except (HopFailed, ProtocolError) as e:
                logger.info(f"{e}; checking blocks {hop.start}:{hop.end} on another peer")
                stream.close()
                continue
            if keep:
                self.shadows[key] = Shadow(stream, len(inputs), output)
            else:
                stream.close()
            return Recomputed(peer_id, output)
        return None

    async def _step(self, stream: HopStream, sent: StepInput) -> torch.Tensor:
        output, _ = await stream.step(sent.hidden, sent.mask, self.settings.step_timeout, self.probe,
                                      reorder=sent.reorder)
        return output

    def close(self) -> None:
        for shadow in self.shadows.values():
            shadow.stream.close()
        self.shadows.clear()

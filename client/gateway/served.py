"""The models an OpenAI gateway serves, one SwarmClient each, and the swarm checks behind /health and /v1/models.

The checks are swarm-health's own (client/health/): coverage is judged the same way everywhere.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from client import loop
from client.health.gather import gather
from client.health.report import HealthReport
from client.text import SwarmClient
from swarm.errors import ModelReferenceError
from swarm.reference import resolve_model


@dataclass(frozen=True)
class ServedModel:
    id: str  # the model's name, as clients send it in requests
    ref: str  # the reference the operator gave, as health resolves it
    dht_prefix: str
    client: SwarmClient


class Gateway:
    """Served models by id. Joining the swarm is blocking: call from a worker thread, never the event loop."""

    def __init__(self, models: list[ServedModel], initial_peers: list[str], check_timeout: float = 5.0):
        self.models = {m.id: m for m in models}
        self.initial_peers = initial_peers  # how others join the same swarm (the console shows it)
        self.check_timeout = check_timeout
        self.started = int(time.time())

    @classmethod
    def connect(cls, initial_peers: list[str], refs: list[str], **settings) -> "Gateway":
        """Resolve every reference first (a typo fails before any network work), then join the swarm once per model.

        Raises ModelReferenceError for a reference that names nothing or two that name the same model,
        SwarmError if the swarm cannot be reached.
        """
        resolved = [resolve_model(ref) for ref in refs]
        names = [model.name for model in resolved]
        if len(set(names)) < len(names):
            raise ModelReferenceError(f"models with the same name cannot be told apart in requests: {', '.join(names)}")
        served: list[ServedModel] = []
        try:
            for ref, model in zip(refs, resolved):
                client = SwarmClient(initial_peers, ref, **settings)
                served.append(ServedModel(model.name, ref, model.dht_prefix, client))
        except BaseException:
            for done in served:
                done.client.close()
            raise
        return cls(served, initial_peers)

    def check(self) -> HealthReport:
        """swarm-health's report on the served models (blocking). Raises SwarmError if the swarm does not answer."""
        first = next(iter(self.models.values()))
        refs = [m.ref for m in self.models.values()]
        return loop.run(gather(first.client.model.dht, refs, self.check_timeout))

    def covered(self, report: HealthReport) -> list[ServedModel]:
        """The served models whose every block an online peer serves, in the order they were given."""
        ok = {m.dht_prefix for m in report.models if m.covered}
        return [m for m in self.models.values() if m.dht_prefix in ok]

    def close(self) -> None:
        for model in self.models.values():
            model.client.close()

"""How many threads a peer's passes use without --torch-threads: an equal share of the host's cores.

Each peer left at torch's default runs one thread per core, so several peers on one machine (a demo,
the tests, one peer per GPU of a box) run several times more busy threads than cores, and OpenMP's
spinning threads take the cores from the peer whose turn it is (docs/performance.md has the figures).
So every peer on a host holds a file named by its pid in `<cache root>/peers-on-host/` while it runs,
and uses the cores divided by the live peers, at least one: a peer alone keeps them all. The share
is read again every few seconds, so peers that start or stop later change it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from swarm.gguf_shards import data_dir
from swarm.lifetime import is_alive

RECHECK_SECONDS = 5.0


class CoreShare:
    """This process's entry among the host's peers, and its share of the cores."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder or data_dir() / "peers-on-host"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cores = torch.get_num_threads()  # torch's own choice for one process: the cores it may use
        self.entry = self.folder / str(os.getpid())
        self.entry.touch()

    def peers(self) -> int:
        """Peers running on this host, this one included; entries of processes that died are removed."""
        count = 0
        for entry in self.folder.iterdir():
            if entry.name.isdigit() and is_alive(int(entry.name)):
                count += 1
            elif entry.name.isdigit():
                entry.unlink(missing_ok=True)
        return max(count, 1)

    def threads(self) -> int:
        return max(1, self.cores // self.peers())

    def close(self) -> None:
        self.entry.unlink(missing_ok=True)


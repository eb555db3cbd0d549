"""Peers on one host share its cores: each takes the cores over the live peers, a lone peer all of them."""
from __future__ import annotations

import subprocess

from peer.cores import CoreShare


def test_peers_on_one_host_split_its_cores_and_forget_the_dead(tmp_path):
    mine = CoreShare(tmp_path)
    assert mine.peers() == 1 and mine.threads() == mine.cores  # alone: every core
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / str(other.pid)).touch()  # what a second peer's CoreShare writes
        (tmp_path / "notes.txt").touch()  # not an entry
        assert mine.peers() == 2 and mine.threads() == max(1, mine.cores // 2)
    finally:
        other.kill()
        other.wait()
    assert mine.peers() == 1 and not (tmp_path / str(other.pid)).exists()  # a dead peer's entry is removed
    mine.close()
    assert not mine.entry.exists()

"""Start real swarm-serve processes on this machine and wait until they serve: for the demo, tests and benchmarks."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from swarm.lifetime import die_with_parent


class PeerStartError(RuntimeError):
    pass


@dataclass
class PeerProcess:
    process: subprocess.Popen
    log: Path
    maddrs: list[str] = field(default_factory=list)
    ready_line: str = ""
    metrics_url: str = ""  # with --metrics-port
    lines: "queue.Queue[str]" = field(default_factory=queue.Queue)
    reader: threading.Thread | None = None  # puts stdout into `lines`; ends at the process's end

    @property
    def peer_id(self) -> str:
        return self.maddrs[0].rsplit("/p2p/", 1)[1]

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            self.process.terminate()
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def launch_peer(args: list[str], log_dir: Path, name: str, env: dict | None = None,
                netns: str | None = None, module: str = "peer.cli") -> PeerProcess:
    """Run `swarm-serve ARGS` without waiting for it: its stdout lines arrive in `lines`, its stderr goes to
    LOG_DIR/NAME.log. With NETNS, it runs in that network namespace (tests/network_rig.py). MODULE is the
    program, for a test's own variant of the peer (tests/lying_peer.py)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    inside = ["ip", "netns", "exec", netns] if netns else []
    process = subprocess.Popen(  # its own session: a group signal meant for us is not its stop
        [*inside, sys.executable, "-m", module, *args],
        start_new_session=True,
        preexec_fn=die_with_parent,
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        cwd=Path(__file__).resolve().parent.parent,
    )
    peer = PeerProcess(process, log)
    peer.reader = threading.Thread(target=_pump, args=(process, peer.lines), daemon=True)
    peer.reader.start()
    return peer


def start_peer(args: list[str], log_dir: Path, name: str, timeout: float = 180, env: dict | None = None,
               netns: str | None = None, module: str = "peer.cli") -> PeerProcess:
    """Run `swarm-serve ARGS` and return once it printed `ready`; its stderr goes to LOG_DIR/NAME.log."""
    peer = launch_peer(args, log_dir, name, env, netns, module)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = peer.lines.get(timeout=0.5)
        except queue.Empty:
            if peer.process.poll() is not None:
                break
            continue
        if line.startswith("listening on "):
            peer.maddrs.append(line.split(" ", 2)[2].strip())
        elif line.startswith("metrics on "):
            peer.metrics_url = line.split(" ", 2)[2].strip()
        elif line.startswith("ready"):
            peer.ready_line = line.strip()
            return peer
    peer.stop(5)
    raise PeerStartError(f"peer {name} did not become ready (exit {peer.process.poll()}); log:\n{peer.log.read_text()[-3000:]}")


def _pump(process: subprocess.Popen, lines: "queue.Queue[str]") -> None:
    assert process.stdout is not None  # started with stdout=PIPE
    for line in process.stdout:
        lines.put(line)


class LocalSwarm:
    """Several peers on 127.0.0.1: the first starts a new swarm, the others join it."""

    def __init__(self, log_dir: Path, common_args: list[str] | None = None):
        self.log_dir, self.common_args = log_dir, common_args or []
        self.peers: list[PeerProcess] = []

    @property
    def initial_peers(self) -> list[str]:
        return [m for p in self.peers[:1] for m in p.maddrs]

    def add(self, args: list[str], name: str | None = None, env: dict | None = None,
            module: str = "peer.cli") -> PeerProcess:
        join = ["--new-swarm"] if not self.peers else [a for m in self.initial_peers for a in ("--initial-peers", m)]
        peer = start_peer([*join, *self.common_args, *args], self.log_dir, name or f"peer{len(self.peers)}", env=env,
                          module=module)
        self.peers.append(peer)
        return peer

    def stop(self) -> None:
        for peer in reversed(self.peers):
            peer.stop()

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

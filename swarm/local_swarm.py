"""Start real swarm-serve processes on this machine and wait until they serve: for the demo, tests and benchmarks."""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from swarm.lifetime import die_with_parent


START_TIMEOUT = 180.0  # seconds a peer may take to serve: a cold conversion of the default model included


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


def start_peer(args: list[str], log_dir: Path, name: str, timeout: float = START_TIMEOUT, env: dict | None = None,
               netns: str | None = None, module: str = "peer.cli") -> PeerProcess:
    """Run `swarm-serve ARGS` and return once it printed `ready`; its stderr goes to LOG_DIR/NAME.log."""
    peer = launch_peer(args, log_dir, name, env, netns, module)
    wait_ready(peer, name, timeout)
    return peer


def wait_ready(peer: PeerProcess, name: str, timeout: float = START_TIMEOUT) -> None:
    """Return once a launched peer printed `ready`, noting its addresses; stop it and raise if it never does."""
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
            return
    peer.stop(5)
    raise PeerStartError(f"peer {name} did not become ready (exit {peer.process.poll()}); log:\n{peer.log.read_text()[-3000:]}")


def free_port() -> int:
    """A TCP port nobody listens on right now (another process may still take it before we do)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def new_identity(path: Path) -> str:
    """Write a new private key file for a peer and return its peer id."""
    from hivemind.p2p import P2P, PeerID

    P2P.generate_identity(str(path))
    return PeerID.from_identity(path.read_bytes()).to_base58()


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

    def add_together(self, peers: list[list[str]], names: list[str] | None = None) -> list[PeerProcess]:
        """Start several peers at once and return when all serve: a start is mostly imports on one core, so
        on a multi-core host several take about as long as one. Into an empty swarm, the first of them
        starts it on a port and identity chosen here, and the others keep trying it until it answers."""
        if not peers:
            return []
        names = names or [f"peer{len(self.peers) + i}" for i in range(len(peers))]
        launched, joiners = [], list(zip(peers, names))
        if self.peers:
            entry = self.initial_peers
        else:
            (args, name), *joiners = joiners
            identity, port = self.log_dir / f"{name}.key", free_port()
            entry = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{new_identity(identity)}"]
            launched.append(launch_peer(["--new-swarm", "--port", str(port), "--identity", str(identity),
                                         *self.common_args, *args], self.log_dir, name))
        join = [a for m in entry for a in ("--initial-peers", m)] + ["--join-timeout", str(START_TIMEOUT)]
        launched += [launch_peer([*join, *self.common_args, *args], self.log_dir, name) for args, name in joiners]
        self.peers += launched  # stopped by stop() whatever happens below
        for peer, name in zip(launched, names):
            wait_ready(peer, name)
        return launched

    def stop(self) -> None:
        for peer in reversed(self.peers):
            peer.stop()

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

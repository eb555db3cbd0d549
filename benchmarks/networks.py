"""Three peers across shaped links, reached directly or through a relay: the shape of the Petals paper's table.

    python -m benchmarks.networks                              # both links, both modes, sequences 128 and 2048
    python -m benchmarks.networks --links 1gbit-5ms --modes relayed --lengths 128

Hosts are network namespaces (tests/network_rig.py); needs root. Each reachable peer's link is a delay
proxy in its namespace (benchmarks/delay_proxy.py: one-way delay, bandwidth cap) in front of its
port, so a connection to it crosses one shaped link. `direct`: three public peers (blocks 0:10, 10:20,
20:30). `relayed`: one public peer, the relay, and two peers behind their own NATs; a hop to those
crosses the relay's link twice. The client sits behind a NAT of its own. Greedy tokens must equal
transformers' on the same weights, or the benchmark stops.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import typer

from benchmarks.common import console, machine_info, parse_list, table, write_results
from benchmarks.network_client import prompt_ids
from swarm.local_swarm import PeerProcess, start_peer
from swarm.reference import resolve_model
from tests.network_rig import Host, NetworkRig

LINKS = {"1gbit-5ms": (2.0, 1000.0), "100mbit-100ms": (50.0, 100.0)}  # one-way delay ms, Mbit/s (RTT = 2 x delay)
PETALS_STEPS_PER_S = {"1gbit-5ms": 1.71, "100mbit-100ms": 1.23}  # BLOOM-176B on 3x A100 (Borzunov et al.)
SPANS = ["0:10", "10:20", "20:30"]
PUBLIC_PORT, PEER_PORT = 31337, 31338  # the proxy's, and the peer's behind it
app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


def start_host_peer(host: Host, link: str, blocks: str, entrance: str | None, logs: Path,
                    processes: list) -> PeerProcess:
    join = ["--new-swarm"] if entrance is None else ["--initial-peers", entrance]
    if host.public:
        delay, mbps = LINKS[link]
        processes.append(subprocess.Popen(host.command(
            sys.executable, "-m", "benchmarks.delay_proxy", "run", "--listen-host", host.address, "--listen-port",
            str(PUBLIC_PORT), "--target-port", str(PEER_PORT), "--delay-ms", str(delay), "--bandwidth-mbps", str(mbps)),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        where = ["--host", "127.0.0.1", "--port", str(PEER_PORT), "--announce-maddrs",
                 f"/ip4/{host.address}/tcp/{PUBLIC_PORT}"]
    else:  # nobody can connect to it: its traffic goes through the relay's link
        where = ["--host", host.address, "--port", str(PEER_PORT)]
    peer = start_peer([*join, "--blocks", blocks, "--dtype", "float32", *where], logs, f"{host.name}", netns=host.name)
    processes.append(peer)
    return peer


def measure(link: str, mode: str, lengths: list[int], new: int, logs: Path) -> list[dict]:
    with NetworkRig() as rig:
        client = rig.home_host("client")
        hosts = [rig.public_host("p1")] + [rig.public_host(f"p{i}") if mode == "direct" else rig.home_host(f"h{i}")
                                           for i in (2, 3)]
        processes: list = []
        try:
            entrance = None
            for host, blocks in zip(hosts, SPANS):
                peer = start_host_peer(host, link, blocks, entrance, logs, processes)
                entrance = entrance or peer.maddrs[0]
            assert entrance is not None
            done = subprocess.run(client.command(sys.executable, "-m", "benchmarks.network_client", entrance,
                                                 "--lengths", ",".join(map(str, lengths)), "--new", str(new)),
                                  capture_output=True, text=True, timeout=1200)
            if done.returncode != 0:
                raise RuntimeError(f"the client failed on {link} {mode}:\n{done.stderr[-3000:]}")
            return json.loads(done.stdout.strip().splitlines()[-1])
        finally:
            for process in reversed(processes):
                process.stop(10) if isinstance(process, PeerProcess) else process.kill()


@app.command()
def main(links: str = typer.Option(",".join(LINKS), help="Link profiles: " + ", ".join(LINKS)),
         modes: str = "direct,relayed", lengths: str = "128,2048", new: int = typer.Option(24, help="tokens per run")) -> None:
    chosen, wanted, sizes = parse_list(links, str), parse_list(modes, str), parse_list(lengths)
    model = resolve_model(None)
    from transformers import AutoModelForCausalLM

    assert model.gguf_file is not None  # the default model ships as a GGUF file
    reference = AutoModelForCausalLM.from_pretrained(model.gguf_file.parent, gguf_file=model.gguf_file.name,
                                                     dtype=torch.float32).eval()
    expected = {}
    with torch.no_grad():
        for length in sizes:
            ids = prompt_ids(length, model.config.vocab_size)
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
            expected[length] = out[0, length:].tolist()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as logs:
        for link in chosen:
            for mode in wanted:
                console.print(f"[bold]{link}, {mode}[/bold]")
                for run in measure(link, mode, sizes, new, Path(logs)):
                    if run["tokens"] != expected[run["length"]]:
                        raise SystemExit(f"{link} {mode} sequence {run['length']}: tokens differ from transformers'")
                    results.append({"link": link, "mode": mode, **{k: v for k, v in run.items() if k != "tokens"}})
                    rows.append([link, mode, run["length"], run["ttft_s"], run["steps_per_s"],
                                 PETALS_STEPS_PER_S[link] if run["length"] == 128 else None])
    console.print(table("decode through 3 peers (SmolLM2-135M, 10 blocks each, float32)",
                        ["link", "reached", "sequence", "TTFT s", "steps/s", "Petals steps/s (BLOOM-176B)"], rows))
    path = write_results("networks", {"machine": machine_info(), "new_tokens": new, "results": results})
    console.print(f"results: {path}")


if __name__ == "__main__":
    app()

"""How close a swarm comes to the same model in one process: the numbers behind issue #7.

    python -m benchmarks.speed                       # baseline, one peer, three peers; 5 runs
    python -m benchmarks.speed --runs 1 --concurrency 1,4 --delay-ms 0,25

Every figure is the median of `--runs` runs; in each run the local baseline (transformers `generate`
on the same weights, in this process) and every swarm are measured one after another, so ratios
compare like with like on a busy machine. The swarm's greedy tokens must equal the baseline's, or
the benchmark stops: a fast wrong answer is worth nothing. Peers are real `swarm-serve` processes on
127.0.0.1. See docs/performance.md for what each figure means.
"""
from __future__ import annotations

import shlex
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import typer

from benchmarks.common import (
    Bootstrap, check_route, cold_route, console, load_average, machine_info, median, parse_list, summary, table,
    warm_routes, write_results,
)

SPLITS = {"one": ["0:30"], "three": ["0:10", "10:20", "20:30"]}
START_BLOCKS = "0:10"  # the peer whose start-to-ready time is measured
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books far "
    "faster than any scribe. Within fifty years presses were running in more than two hundred cities across "
    "Europe, and the price of books fell so sharply that reading spread from monasteries to merchants. "
)
WARM_ROUTE_REPEATS = 20
app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


@dataclass
class Generation:
    """One greedy generation timed token by token."""

    ttft_s: float  # call start to the first new token: prefill (and, in a swarm, opening the session)
    decode_tokens_per_s: float  # every token after the first
    tokens: list[int]


class _Clock:
    """A streamer that notes when each new token arrives; `generate` first puts the prompt."""

    def __init__(self, on_first: Callable[[], None] | None = None):
        self.times: list[float] = []
        self.on_first = on_first
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if not self.times and self.on_first is not None:
            self.on_first()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_generate(generate: Callable[..., torch.Tensor], ids: torch.Tensor, new_tokens: int,
                   on_first: Callable[[], None] | None = None) -> tuple[Generation, _Clock]:
    """Greedy, EOS disabled, `new_tokens + 1` tokens: the first one closes the prefill, the rest are decode."""
    clock = _Clock(on_first)
    started = time.perf_counter()
    out = generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens + 1, do_sample=False,
                   eos_token_id=None, streamer=clock)
    tokens = out[0, ids.shape[1]:].tolist()
    assert len(tokens) == new_tokens + 1, f"expected {new_tokens + 1} tokens, got {len(tokens)}"
    decode = clock.times[-1] - clock.times[0]
    return Generation(clock.times[0] - started, new_tokens / decode, tokens), clock


class Baseline:
    """transformers' own model on the same weights, in this process: the physical limit (float32 on the CPU here)."""

    def __init__(self, model, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.disable_progress_bar()  # the GGUF de-quantization bar would bury the tables in a log
        logging.set_verbosity_error()
        if model.gguf_file is not None:
            file = model.gguf_file
            self.model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model.folder, dtype=dtype)
        self.model.to(device).eval()
        self.device = device
        self.pad = model.tokenizer().pad_token_id or 0

    def generate(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        kwargs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with torch.inference_mode():
            return self.model.generate(ids.to(self.device), pad_token_id=self.pad, **kwargs).cpu()


@dataclass
class Target:
    """One swarm configuration under test: its client, and what to do before each measurement."""

    name: str
    client: Any  # DistributedModelForCausalLM
    initial_peers: list[str]
    prepare: Callable[[], None] = lambda: None
    proxies: Any = None  # ProxyHost when the peers sit behind delay proxies
    results: dict[str, list] = field(default_factory=dict)

    def record(self, key: str, value: Any) -> None:
        self.results.setdefault(key, []).append(value)


def concurrent_decode(client, ids: torch.Tensor, new_tokens: int, sessions: int, expected: list[int]) -> float:
    """Aggregate decode tokens/s of `sessions` threads generating at once on one client object.

    A barrier after every thread's first token starts the clock, so all sessions are open and decoding
    together; prefill is left out. Each thread's tokens must equal the baseline's.
    """
    barrier = threading.Barrier(sessions, timeout=300)
    started: list[float] = []
    ends: list[float] = []
    errors: list[BaseException] = []

    def first_token() -> None:
        if barrier.wait() == 0:
            started.append(time.perf_counter())

    def worker() -> None:
        try:
            generation, clock = timed_generate(client.generate, ids, new_tokens, on_first=first_token)
            assert generation.tokens == expected, "a concurrent session's tokens differ from the baseline's"
            ends.append(clock.times[-1])
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, name=f"session-{i}") for i in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sessions * new_tokens / (max(ends) - started[0])


def batch_decode(baseline: "Baseline", ids: torch.Tensor, new_tokens: int, sessions: int) -> float:
    """Aggregate decode tokens/s of one process generating `sessions` copies of the prompt as one batch:
    what the concurrent sessions would cost on one machine (issue #24)."""
    generation, _ = timed_generate(baseline.generate, ids.repeat(sessions, 1), new_tokens)
    return sessions * generation.decode_tokens_per_s


def _prompt(tokenizer, length: int) -> torch.Tensor:
    text = PROMPT_TEXT
    while len(tokenizer(text).input_ids) < length:
        text += PROMPT_TEXT
    return tokenizer(text, return_tensors="pt").input_ids[:, :length]


def _client_settings(pairs: list[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--client-setting")
        settings[key.strip().replace("-", "_")] = value.strip()  # ClientSettings (pydantic) converts the type
    return settings


def _payload_bytes(positions: int, model) -> int:
    return positions * model.hidden_size * 4  # float32 hidden states, one way, per hop


@app.command()
def main(
    splits: str = typer.Option("one,three", help="Swarms: one (0:30), three (0:10,10:20,20:30); '' for none."),
    runs: int = typer.Option(5, min=1, help="Runs per figure; the median is reported."),
    new_tokens: int = typer.Option(64, min=2, help="Decode tokens timed per generation (after the first token)."),
    prompt_tokens: int = typer.Option(100, min=1, help="Prompt length in tokens."),
    concurrency: str = typer.Option("1,2,4,8,16", help="Concurrent sessions, on their own three-peer swarm; '' to skip."),
    concurrency_peer_arg: list[str] = typer.Option(
        ["--max-batch-rows=4"],
        help="swarm-serve arguments added for the concurrency swarm: its three peers share this machine's cores."),
    delay_ms: str = typer.Option("", help="One-way delays for a three-peer swarm behind proxies, e.g. 0,5,25,50."),
    bandwidth_mbps: Optional[float] = typer.Option(None, help="Bandwidth cap of each proxy, Mbit/s per direction."),
    start_runs: Optional[int] = typer.Option(None, help="Peer start-to-ready runs (default: --runs; 0 to skip)."),
    model_ref: str = typer.Option("smollm2-135m", "--model", help="Model reference, as swarm-serve --model takes."),
    peer_threads: Optional[int] = typer.Option(
        None, help="--torch-threads of every peer (default: the peers' own, a share of this host's cores)."),
    client_setting: list[str] = typer.Option([], help="KEY=VALUE passed to the client (ClientSettings); repeatable."),
    peer_arg: list[str] = typer.Option([], help="swarm-serve arguments for every peer: --peer-arg=--dtype=bfloat16."),
    baseline_dtypes: str = typer.Option(
        "float32,float16", help="transformers baselines: the first checks tokens and gives '× base'; "
                                "'× fastest' is over the fastest of them (and of their batches, for concurrency)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Result file (default: benchmarks/results/)."),
) -> None:
    """Measure the baseline and the swarms in the same run, print ratios, write JSON."""
    from client import DistributedModelForCausalLM, loop
    from swarm.local_swarm import LocalSwarm, start_peer
    from swarm.reference import resolve_model

    split_names = parse_list(splits, str)
    unknown = set(split_names) - set(SPLITS)
    if unknown:
        raise typer.BadParameter(f"unknown {sorted(unknown)}; choose from {sorted(SPLITS)}", param_hint="--splits")
    levels, delays = parse_list(concurrency), parse_list(delay_ms, float)
    settings = _client_settings(client_setting)
    threads: int | str = peer_threads or "a share of the cores"
    extra = [a for arg in peer_arg for a in shlex.split(arg)]
    peer_args = ["--model", model_ref, *(["--torch-threads", str(peer_threads)] if peer_threads else []), *extra]
    start_runs = runs if start_runs is None else start_runs
    logs = Path(tempfile.mkdtemp(prefix="speed-bench-"))
    model = resolve_model(model_ref)
    ids = _prompt(model.tokenizer(), prompt_tokens)
    info = machine_info()
    console.print(f"{model.name}: prompt {ids.shape[1]} tokens, {new_tokens} decode tokens, {runs} runs; "
                  f"peer torch threads {threads}, client {torch.get_num_threads()}; peer logs {logs}")

    def add_client(stack: ExitStack, initial_peers: list[str]):
        client = DistributedModelForCausalLM.from_pretrained(model_ref, initial_peers=initial_peers, **settings)
        stack.callback(client.close)
        return client

    def start_swarm(stack: ExitStack, label: str, split: str, args: list[str]) -> list[str]:
        swarm = stack.enter_context(LocalSwarm(logs / label, args))
        for blocks in SPLITS[split]:
            with console.status(f"starting a peer for blocks {blocks} ({label})"):
                swarm.add(["--blocks", blocks], f"{label}-{blocks.replace(':', '-')}")
        return swarm.initial_peers

    with console.status("loading the baselines (transformers)"):
        baselines = {name: Baseline(model, dtype=getattr(torch, name)) for name in parse_list(baseline_dtypes, str)}
        reference = next(iter(baselines.values()))
        expected = timed_generate(reference.generate, ids, new_tokens)[0].tokens
    targets: list[Target] = []
    baseline_runs: dict[str, list[Generation]] = {name: [] for name in baselines}
    start_times: list[float] = []
    with ExitStack() as stack:
        for split in split_names:
            initial_peers = start_swarm(stack, split, split, peer_args)
            name = f"{split} peer{'s' if len(SPLITS[split]) > 1 else ''}"
            targets.append(Target(name, add_client(stack, initial_peers), initial_peers))
        if delays:
            targets += _proxied_targets(stack, logs, peer_args, delays, bandwidth_mbps,
                                        lambda initial_peers: add_client(stack, initial_peers))

        with console.status("warming up"):
            for target in targets:
                target.prepare()
                _check_tokens(target, timed_generate(target.client.generate, ids, new_tokens)[0], expected)
        for run in range(runs):
            for name, baseline in baselines.items():
                with console.status(f"run {run + 1}/{runs}: baseline {name}"):
                    baseline_runs[name].append(timed_generate(baseline.generate, ids, new_tokens)[0])
                    if baseline is reference:  # another precision may pick other tokens: it is timed only
                        _check_tokens(None, baseline_runs[name][-1], expected)
                _progress(f"run {run + 1}/{runs}", f"baseline {name}", baseline_runs[name][-1])
            for target in targets:
                with console.status(f"run {run + 1}/{runs}: {target.name}"):
                    _measure_target(target, ids, new_tokens, expected, model, loop)
                _progress(f"run {run + 1}/{runs}", target.name, target.results["generation"][-1])

        join = targets[0].initial_peers if targets else []
        for run in range(start_runs if join else 0):
            with console.status(f"peer start to ready, run {run + 1}/{start_runs}"):
                started = time.perf_counter()
                args = [*(a for m in join for a in ("--initial-peers", m)), *peer_args, "--blocks", START_BLOCKS]
                peer = start_peer(args, logs, f"start-{run}")
                start_times.append(time.perf_counter() - started)
                peer.stop()
            console.print(f"peer start, run {run + 1}/{start_runs}: {start_times[-1]:.2f} s", highlight=False)

    # the swarms above are stopped: the concurrency swarm has the machine to itself
    concurrency_args = [*peer_args, *(a for arg in concurrency_peer_arg for a in shlex.split(arg))]
    concurrency_results: dict[int, list[float]] = {}
    batch_results: dict[int, list[float]] = {}  # the fastest baseline's batch of as many prompts, per run
    with ExitStack() as stack:
        if levels:
            concurrent = add_client(stack, start_swarm(stack, "concurrency", "three", concurrency_args))
            with console.status("warming up"):
                _check_tokens(None, timed_generate(concurrent.generate, ids, new_tokens)[0], expected)
        for run in range(runs if levels else 0):  # every level in each run: the ratios compare neighbouring minutes
            for level in levels:
                with console.status(f"{level} concurrent sessions, run {run + 1}/{runs}"):
                    rate = concurrent_decode(concurrent, ids, new_tokens, level, expected)
                    concurrency_results.setdefault(level, []).append(rate)
                with console.status(f"one process, a batch of {level}, run {run + 1}/{runs}"):
                    batched = max(batch_decode(b, ids, new_tokens, level) for b in baselines.values())
                    batch_results.setdefault(level, []).append(batched)
                console.print(f"{level} sessions, run {run + 1}/{runs}: {rate:.2f} tok/s "
                              f"(one process batching them: {batched:.2f})", highlight=False)

    report = _report(model, ids, new_tokens, runs, threads, settings, peer_args, delays, bandwidth_mbps,
                     baseline_runs, targets, concurrency_args, concurrency_results, batch_results, start_times, info)
    path = write_results("speed", report, json_path)
    console.print(f"wrote {path}")


def _progress(run: str, name: str, generation: Generation) -> None:
    """One line per measurement, so a long run shows how it goes (and a log keeps every value)."""
    console.print(f"{run}: {name}: TTFT {generation.ttft_s:.3f} s, {generation.decode_tokens_per_s:.2f} tok/s",
                  highlight=False)


def _check_tokens(target: Target | None, generation: Generation, expected: list[int]) -> None:
    if generation.tokens != expected:
        where = target.name if target else "the baseline"
        first = next(i for i, (a, b) in enumerate(zip(generation.tokens, expected)) if a != b)
        raise SystemExit(f"{where} generated different tokens from token {first} on: the benchmark is void")


def _measure_target(target: Target, ids: torch.Tensor, new_tokens: int, expected: list[int], model, loop) -> None:
    """One run of one swarm: a timed generation (tokens checked), warm route builds, one cold route."""
    target.prepare()
    before = target.proxies.bytes() if target.proxies else None
    generation = timed_generate(target.client.generate, ids, new_tokens)[0]
    _check_tokens(target, generation, expected)
    target.record("generation", generation)
    if before is not None:
        moved = [(up - up0, down - down0) for (up, down), (up0, down0) in zip(target.proxies.bytes(), before)]
        least = _payload_bytes(ids.shape[1] + new_tokens, model)
        if any(min(pair) < least for pair in moved):
            raise SystemExit(f"{target.name}: a proxy forwarded {moved} bytes, less than the {least} bytes of hidden "
                             "states each hop must see: the client reached a peer around its proxy")
        target.record("proxy_bytes", moved)
    target.record("warm_route_s", median(loop.run(warm_routes(target.client.view, WARM_ROUTE_REPEATS))))
    timing, hops = loop.run(cold_route(target.initial_peers, model))
    check_route(hops, model.num_blocks)
    target.record("cold_route", timing.as_dict())


def _proxied_targets(stack: ExitStack, logs: Path, peer_args: list[str], delays: list[float],
                     bandwidth_mbps: float | None, add_client) -> list[Target]:
    """Three peers, each behind its own delay proxy, joined through a bootstrap node that serves nothing;
    one Target per delay (the proxies' delay changes between measurements)."""
    from benchmarks.delay_proxy import ProxyHost, start_proxied_peer

    bootstrap = Bootstrap()
    stack.callback(bootstrap.close)
    proxies = ProxyHost()
    stack.callback(proxies.close)
    for blocks in SPLITS["three"]:
        with console.status(f"starting a peer for blocks {blocks} behind a proxy"):
            peer, _ = start_proxied_peer(proxies, [*peer_args, "--blocks", blocks], logs / "proxied",
                                         f"proxied-{blocks.replace(':', '-')}", bootstrap.maddrs)
            stack.callback(peer.stop)
    client = add_client(bootstrap.maddrs)
    targets = []
    for delay in delays:
        def prepare(delay: float = delay) -> None:
            proxies.set_link(delay, bandwidth_mbps)
            time.sleep(2 * delay / 1000 + 0.05)  # chunks already scheduled under the old link drain first
        targets.append(Target(f"three peers, {delay:g} ms" + (f", {bandwidth_mbps:g} Mbit/s" if bandwidth_mbps else ""),
                              client, bootstrap.maddrs, prepare, proxies))
    return targets


def _report(model, ids, new_tokens, runs, threads, settings, peer_args, delays, bandwidth_mbps, baseline_runs,
            targets, concurrency_args, concurrency_results, batch_results, start_times, info) -> dict[str, Any]:
    """Print the tables and return the JSON document."""
    base_ttfts = {name: median(g.ttft_s for g in runs_) for name, runs_ in baseline_runs.items()}
    base_rates = {name: median(g.decode_tokens_per_s for g in runs_) for name, runs_ in baseline_runs.items()}
    base_ttft, base_rate = next(iter(base_ttfts.values())), next(iter(base_rates.values()))
    fastest = max(base_rates.values())
    rows = [[f"baseline (transformers {name}, 1 process)", base_ttfts[name], base_ttfts[name] / base_ttft, rate,
             rate / base_rate, rate / fastest, 1000 / rate, None, None] for name, rate in base_rates.items()]
    swarms = {}
    for target in targets:
        generations = target.results["generation"]
        ttft = median(g.ttft_s for g in generations)
        rate = median(g.decode_tokens_per_s for g in generations)
        warm = median(target.results["warm_route_s"])
        cold = [c["total_s"] for c in target.results["cold_route"]]
        rows.append([target.name, ttft, ttft / base_ttft, rate, rate / base_rate, rate / fastest, 1000 / rate,
                     warm * 1000, median(cold)])
        swarms[target.name] = {
            "ttft_s": summary(g.ttft_s for g in generations),
            "ttft_ratio": round(ttft / base_ttft, 3),
            "decode_tokens_per_s": summary(g.decode_tokens_per_s for g in generations),
            "decode_ratio": round(rate / base_rate, 3),
            "decode_ratio_to_fastest": round(rate / fastest, 3),
            "warm_route_s": summary(target.results["warm_route_s"], 6),
            "cold_route_s": summary(cold),
            "cold_route_stages": target.results["cold_route"],
            "proxy_bytes_per_generation": target.results.get("proxy_bytes"),
        }
    console.print(table(f"{model.name}: {ids.shape[1]}-token prompt, {new_tokens} decode tokens, median of {runs} runs",
                        ["", "TTFT s", "× base", "decode tok/s", "× base", "× fastest", "ms/token", "warm route ms",
                         "cold route s"],
                        rows))
    concurrency = {}
    if concurrency_results:
        ones = concurrency_results.get(1)
        crow = []
        for level, rates in concurrency_results.items():
            # each run measured every level within minutes: the ratio of a run's pair, median over runs
            rate, ratio = median(rates), median([r / o for r, o in zip(rates, ones)]) if ones else None
            batched = median([r / b for r, b in zip(rates, batch_results[level])])
            crow.append([level, rate, rate / level, ratio, median(batch_results[level]), batched])
            concurrency[level] = {"aggregate_tokens_per_s": summary(rates),
                                  "ratio_to_one_session": None if ratio is None else round(ratio, 3),
                                  "one_process_batch_tokens_per_s": summary(batch_results[level]),
                                  "ratio_to_one_process_batch": round(batched, 3)}
        console.print(table(f"three peers with {' '.join(concurrency_args[len(peer_args):])}, concurrent sessions (decode only)",
                            ["sessions", "aggregate tok/s", "per session", "× 1 session", "one process, batched",
                             "× batched"], crow))
    if start_times:
        console.print(table("peer start", ["", "median s", "min s", "max s"],
                            [[f"swarm-serve --blocks {START_BLOCKS}: spawn to ready", median(start_times),
                              min(start_times), max(start_times)]]))
    result_targets = _targets_met(swarms, start_times, concurrency)
    console.print(table("targets (issues #7, #8, #24)", ["figure", "value", "target", "met"],
                        [[k, v["value"], v["target"], "yes" if v["met"] else "NO"] for k, v in result_targets.items()]))
    return {
        "benchmark": "speed",
        "model": model.name,
        "prompt_tokens": ids.shape[1],
        "new_tokens": new_tokens,
        "runs": runs,
        "torch_threads": {"peers": threads, "client_and_baseline": torch.get_num_threads()},
        "client_settings": settings,
        "peer_args": peer_args,
        "concurrency_peer_args": concurrency_args,
        "proxies": {"delays_ms": delays, "bandwidth_mbps": bandwidth_mbps} if delays else None,
        "machine": info,
        "load_average_at_end": load_average(),
        "baselines": {name: {"ttft_s": summary(g.ttft_s for g in runs_),
                             "decode_tokens_per_s": summary(g.decode_tokens_per_s for g in runs_)}
                      for name, runs_ in baseline_runs.items()},
        "swarms": swarms,
        "concurrency": concurrency,
        "peer_start_to_ready_s": summary(start_times) if start_times else None,
        "targets": result_targets,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _targets_met(swarms: dict[str, dict], start_times: list[float], concurrency: dict[int, dict]) -> dict[str, dict]:
    """The issue's targets, for the swarms this run measured."""
    out = {}

    def add(name: str, value: float, target: str, met: bool) -> None:
        out[name] = {"value": round(value, 3), "target": target, "met": bool(met)}

    if "three peers" in swarms:
        s = swarms["three peers"]
        add("three peers: decode × baseline", s["decode_ratio"], "≥ 0.9", s["decode_ratio"] >= 0.9)
        add("three peers: TTFT × baseline", s["ttft_ratio"], "≤ 1.2", s["ttft_ratio"] <= 1.2)
        add("three peers: decode × fastest transformers", s["decode_ratio_to_fastest"], "≥ 0.9",
            s["decode_ratio_to_fastest"] >= 0.9)
    if "one peer" in swarms:
        s = swarms["one peer"]
        add("one peer: decode × baseline", s["decode_ratio"], "≥ 0.95", s["decode_ratio"] >= 0.95)
    for name, s in swarms.items():
        if " ms" not in name:
            warm_ms = s["warm_route_s"]["median"] * 1000
            add(f"{name}: warm route ms", warm_ms, "< 500", warm_ms < 500)
            add(f"{name}: cold route s", s["cold_route_s"]["median"], "< 3", s["cold_route_s"]["median"] < 3)
    if (eight := concurrency.get(8, {}).get("ratio_to_one_session")) is not None:
        add("concurrency swarm: 8 sessions × 1 session", eight, "≥ 4", eight >= 4)
        batched = concurrency[8]["ratio_to_one_process_batch"]
        add("concurrency swarm: 8 sessions × one process batching them", batched, "≥ 0.9", batched >= 0.9)
    if "three peers" in swarms and 1 in concurrency:  # its settings must not cost a lone session anything
        alone = concurrency[1]["aggregate_tokens_per_s"]["median"] / swarms["three peers"]["decode_tokens_per_s"]["median"]
        add("concurrency swarm: 1 session × three peers", alone, "≥ 0.9", alone >= 0.9)
    if start_times:
        add(f"peer start to ready ({START_BLOCKS}) s", median(start_times), "< 15", median(start_times) < 15)
    return out


if __name__ == "__main__":
    app()

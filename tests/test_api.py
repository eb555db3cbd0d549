"""swarm-api against a real one-peer swarm, driven with the official openai package as users would.

The gateway runs as the `swarm-api` command (a subprocess on a free port) serving the default model,
which one peer serves fully, and a tiny model nobody serves. Texts are compared with the swarm
client's own greedy generation in this process (tests/test_generate.py shows that equals transformers).
"""
from __future__ import annotations

import functools
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import SwarmClient
from client.generation import eos_ids
from client.text import PromptError
from swarm.local_swarm import LocalSwarm
from tests.gateway_process import running_api, start_api
from tests.rpc_helpers import info

pytestmark = pytest.mark.slow  # starts peer processes

KEY = "test-key"
MODEL = "smollm2-135m"
UNSERVED = "tiny-unserved"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"
NEW_TOKENS = 8
LONG = 2000  # tokens a generation would take minutes for: only a disconnect ends it early


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory):
    local = LocalSwarm(tmp_path_factory.mktemp("api-logs"), ["--announce-period", "5"])
    try:
        local.add(["--blocks", "0:30"])
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def unserved(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama under a name of its own, with a word-level tokenizer (every word unknown)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("unserved") / UNSERVED
    shutil.copytree(tiny_llama, folder)
    words = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gateway(swarm: LocalSwarm, unserved: Path, tmp_path_factory: pytest.TempPathFactory):
    """The base URL (…/v1) of swarm-api, started as an operator would, stopped with SIGTERM at the end."""
    log = tmp_path_factory.mktemp("api-logs") / "swarm-api.log"
    with running_api("--initial-peers", swarm.initial_peers[0], "--model", MODEL, "--model", str(unserved),
                     "--api-key", KEY, "--log-level", "warning", log=log) as ready:
        assert ready.split()[2:4] == ["serving", f"{MODEL},"], ready
        yield ready.split()[1]


@pytest.fixture(scope="module")
def api(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(swarm: LocalSwarm):
    """The swarm client in this process: the expected texts, and its DHT node asks the peer for its sessions."""
    client = SwarmClient(swarm.initial_peers)
    yield client
    client.close()


@pytest.fixture(scope="module")
def greedy(reference: SwarmClient):
    """greedy(prompt, max_new_tokens) -> (text, tokens generated, finish reason), computed from token ids
    (no TextStream involved), once per module for each prompt."""

    @functools.cache
    def generate(prompt: str, max_new_tokens: int) -> tuple[str, int, str]:
        ids = reference.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        new = reference.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
        ended = new[-1] in eos_ids(reference.model.generation_config)
        return reference.tokenizer.decode(new, skip_special_tokens=True), len(new), "stop" if ended else "length"

    return generate


def prompt_tokens(reference: SwarmClient, prompt: str) -> int:
    return len(reference.tokenizer(prompt, add_special_tokens=False).input_ids)


def chat_prompt(reference: SwarmClient) -> str:
    return reference.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def open_sessions(reference: SwarmClient, swarm: LocalSwarm) -> int:
    return info(reference.model.dht, swarm.peers[0].peer_id).open_sessions


def test_chat_streamed_equals_whole_and_greedy(api: openai.OpenAI, reference: SwarmClient, greedy) -> None:
    whole = api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0)
    [choice] = whole.choices
    text, generated, finish = greedy(chat_prompt(reference), NEW_TOKENS)
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, finish)
    assert "Paris" in text and whole.model == MODEL and whole.object == "chat.completion"
    expected_usage = (prompt_tokens(reference, chat_prompt(reference)), generated)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == expected_usage
    assert whole.usage.total_tokens == sum(expected_usage)

    chunks = list(api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1 and len(chunks) > 4


def test_completion_streamed_equals_whole_and_greedy(api: openai.OpenAI, reference: SwarmClient, greedy) -> None:
    whole = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    [choice] = whole.choices
    text, generated, finish = greedy(PROMPT, NEW_TOKENS)
    assert (choice.text, choice.finish_reason) == (text, finish)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens(reference, PROMPT), generated)

    chunks = list(api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == finish
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stop_strings_cut_the_text(api: openai.OpenAI, greedy) -> None:
    full, _, _ = greedy(PROMPT, NEW_TOKENS)
    stop = full[len(full) // 2: len(full) // 2 + 3]  # three characters that likely straddle two tokens
    expected = full[: full.find(stop)]
    whole = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stop=[stop, "@@@"])
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
    assert whole.usage.completion_tokens < NEW_TOKENS
    chunks = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stop=stop,
                                    stream=True)
    assert "".join(c.choices[0].text for c in chunks) == expected  # nothing of the stop string slipped out


def test_seed_makes_sampling_repeat(api: openai.OpenAI) -> None:
    def sample(seed: int, stream: bool = False) -> str:
        answer = api.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0,
                                        seed=seed, stream=stream)
        return "".join(c.choices[0].text for c in answer) if stream else answer.choices[0].text

    first = sample(1234)
    assert sample(1234, stream=True) == first
    assert sample(4321) != first


def test_concurrent_requests_are_all_correct(api: openai.OpenAI, greedy) -> None:
    prompts = [PROMPT, "def fibonacci(n):", "Once upon a time", "The best way to learn is"]
    expected = [greedy(p, NEW_TOKENS)[0] for p in prompts]

    def complete(prompt: str) -> str:
        return api.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(complete, prompts)) == expected


def test_disconnect_closes_the_session_on_the_peer(gateway: str, reference: SwarmClient, swarm: LocalSwarm) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0}

    def sessions_drop_to(count: int) -> float:
        """The peer learns of a closed session a moment after the client closed it."""
        started = time.monotonic()
        while open_sessions(reference, swarm) > count and time.monotonic() - started < 10:
            time.sleep(0.1)
        assert open_sessions(reference, swarm) == count
        return time.monotonic() - started

    with httpx.Client(base_url=gateway, headers=headers, timeout=60) as http:
        with http.stream("POST", "/completions", json={**body, "stream": True}) as events:
            assert events.status_code == 200
            lines = events.iter_lines()  # kept: dropping the iterator would close the connection
            assert next(lines).startswith("data: {")
            assert open_sessions(reference, swarm) == 1
            # served while the long stream goes on: requests do not queue behind each other
            other = http.post("/completions", json={**body, "max_tokens": 4})
            assert other.status_code == 200 and other.json()["usage"]["completion_tokens"] == 4
            sessions_drop_to(1)  # the short one closed, the long one goes on
        sessions_drop_to(0)

        with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up while it generates
            http.post("/completions", json=body, timeout=2)
        sessions_drop_to(0)


def test_errors_in_openai_format(api: openai.OpenAI, gateway: str) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        api.completions.create(model="no-such-model", prompt=PROMPT)
    assert (missing.value.code, missing.value.param) == ("model_not_found", "model")

    bad_requests = [
        (dict(temperature=5), "temperature", None),
        (dict(n=2), "n", None),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop", None),
        (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role", None),
        (dict(max_tokens=100_000), "messages", "context_length_exceeded"),
        (dict(model=UNSERVED), "messages", "no_chat_template"),
        (dict(frequency_penalty=0.5), "frequency_penalty", None),
    ]
    for fields, param, code in bad_requests:
        with pytest.raises(openai.BadRequestError) as bad:
            api.chat.completions.create(**{"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **fields})
        assert (bad.value.param, bad.value.code, bad.value.type) == (param, code, "invalid_request_error"), fields
        assert code or bad.value.body["message"].startswith(f"{param}: "), bad.value.body

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body, message in [(b"{", "the body is not valid JSON"), (b"[]", "the body must be a JSON object")]:
        answer = httpx.post(f"{gateway}/completions", content=body, headers=headers)
        assert answer.status_code == 400 and answer.json()["error"]["message"].startswith(message), answer.text

    with pytest.raises(openai.AuthenticationError) as wrong:
        openai.OpenAI(base_url=gateway, api_key="wrong", max_retries=0).models.list()
    assert wrong.value.code == "invalid_api_key"
    no_key = httpx.get(f"{gateway}/models")
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"

    def unservable(stream: bool) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as unavailable:
            api.completions.create(model=UNSERVED, prompt="hello there", max_tokens=4, stream=stream)
        return unavailable.value

    with ThreadPoolExecutor(2) as pool:  # each waits the client's route_timeout (5 s) for peers to appear
        for error in pool.map(unservable, [False, True]):
            assert (error.status_code, error.code, error.type) == (503, "swarm_unavailable", "server_error")
            assert "served by nobody" in error.body["message"]


def test_default_max_tokens_yields_to_a_long_prompt(reference: SwarmClient) -> None:
    """A limit the caller set is checked against the context; the gateway's default (fit_context) shrinks to fit.
    start() is lazy: none of this reaches the peers."""
    context = reference.model.config.max_position_embeddings
    prompt = "hello " * (context - 100)
    room = context - prompt_tokens(reference, prompt)
    assert 0 < room < 256
    with pytest.raises(PromptError) as refused:
        reference.start(prompt, max_new_tokens=256)
    assert refused.value.code == "context_length_exceeded"
    for asked, expected in [(256, room), (room - 1, room - 1)]:
        stream = reference.start(prompt, max_new_tokens=asked, fit_context=True)
        assert stream.max_new_tokens == expected
        stream.close()
    with pytest.raises(PromptError) as full:  # no room left at all: refused even as a default
        reference.start("hello " * (context + 10), max_new_tokens=256, fit_context=True)
    assert full.value.code == "context_length_exceeded"


def test_models_health_metrics_and_openapi(api: openai.OpenAI, gateway: str) -> None:
    assert [m.id for m in api.models.list()] == [MODEL]  # the unserved model is configured but not covered

    root = gateway.removesuffix("/v1")
    health = httpx.get(f"{root}/health", timeout=30)
    report = health.json()
    assert health.status_code == 503 and not report["healthy"]
    assert [(m["name"], m["covered"]) for m in report["models"]] == [(MODEL, True), (UNSERVED, False)]
    assert any(UNSERVED in problem for problem in report["problems"])

    def metrics() -> dict[tuple, float]:
        text = httpx.get(f"{root}/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = metrics()
    answer = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="no-such-model", prompt=PROMPT)
    after = metrics()
    moved = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    completions = (("endpoint", "/v1/completions"),)
    assert moved[("swarm_api_requests_total", completions + (("status", "200"),))] == 1
    assert moved[("swarm_api_requests_total", completions + (("status", "404"),))] == 1
    assert moved[("swarm_api_errors_total", (("type", "invalid_request_error"),))] == 1
    assert moved[("swarm_api_tokens_total", (("kind", "prompt"), ("model", MODEL)))] == answer.usage.prompt_tokens
    assert moved[("swarm_api_tokens_total", (("kind", "completion"), ("model", MODEL)))] == answer.usage.completion_tokens
    assert moved[("swarm_api_request_duration_seconds_count", completions)] == 2
    assert moved[("swarm_api_time_to_first_token_seconds_count", (("model", MODEL),))] == 1

    timeline = httpx.get(f"{root}/console/timeline/{answer.id}", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert timeline["id"] == answer.id
    assert [step["positions"] for step in timeline["steps"]] == [answer.usage.prompt_tokens] + [1] * 3
    assert all([(hop["start"], hop["end"]) for hop in step["hops"]] == [(0, 30)] for step in timeline["steps"])
    assert httpx.get(f"{root}/console/timeline/{answer.id}").status_code == 401  # behind the key, like /v1
    console = httpx.get(f"{root}/console/info").json()
    assert console["api_key_required"] and console["models"] == [MODEL, UNSERVED]
    assert console["join"][MODEL].startswith("swarm-serve --model smollm2-135m --initial-peers /ip4/127.0.0.1/")
    page = httpx.get(f"{root}/")
    assert page.status_code == 200 and "/console/static/console.js" in page.text
    assert httpx.get(f"{root}/console/static/console.js").status_code == 200
    assert httpx.get(f"{root}/console/static/..%2Fapp.py").status_code == 404

    schema = httpx.get(f"{root}/openapi.json").json()
    assert {path: sorted(ops) for path, ops in schema["paths"].items()} == {
        "/v1/chat/completions": ["post"], "/v1/completions": ["post"], "/v1/models": ["get"],
        "/health": ["get"], "/metrics": ["get"]}
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "404", "503"} <= set(chat["responses"])
    assert chat["responses"]["200"]["content"]["text/event-stream"]["schema"]["$ref"].endswith("/ChatCompletionChunk")
    assert "ChatCompletionChunk" in schema["components"]["schemas"] and "HTTPBearer" in schema["components"]["securitySchemes"]


def test_limits_answer_429_503_504_at_once(swarm: LocalSwarm, reference: SwarmClient, tmp_path: Path) -> None:
    """A gateway for the public: 4 requests a minute per key, one generation at a time, 3 s per request."""
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0}
    with running_api("--initial-peers", swarm.initial_peers[0], "--model", MODEL, "--api-key", KEY,
                     "--rate-limit", "4", "--max-concurrent", "1", "--request-deadline", "3", "--log-level", "warning",
                     log=tmp_path / "limited.log") as ready, \
            httpx.Client(base_url=ready.split()[1], headers=headers, timeout=60) as http:
        started = time.monotonic()
        with http.stream("POST", "/completions", json={**body, "stream": True}) as events:  # request 1
            lines = events.iter_lines()
            assert events.status_code == 200 and next(lines).startswith("data: {")
            busy = http.post("/completions", json={**body, "max_tokens": 4})  # request 2, while 1 runs
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "overloaded"
            assert busy.headers["retry-after"] == "1"
            last = [line for line in lines if line.startswith("data: ")][-1]  # the stream ends past 3 s
        assert time.monotonic() - started < 30 and '"code":"deadline_exceeded"' in last.replace(" ", "")
        while open_sessions(reference, swarm) and time.monotonic() - started < 30:
            time.sleep(0.1)
        assert open_sessions(reference, swarm) == 0  # the session on the peer ended with the request
        late = http.post("/completions", json=body)  # request 3: not streamed, a 504
        assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
        quick = http.post("/completions", json={**body, "max_tokens": 2})  # request 4: within every limit
        assert quick.status_code == 200 and quick.json()["usage"]["completion_tokens"] == 2
        burst = [http.post("/completions", json={**body, "max_tokens": 2}) for _ in range(3)]  # 5 to 7
        assert [r.status_code for r in burst] == [429, 429, 429]
        assert burst[0].json()["error"]["code"] == "rate_limited" and int(burst[0].headers["retry-after"]) >= 1


def test_cli_bad_arguments_exit_2_with_one_line(unserved: Path) -> None:
    no_swarm, _ = start_api()
    assert no_swarm.wait(60) == 2
    assert no_swarm.stderr.read() == "error: no swarm to serve: give --initial-peers MULTIADDR or set SWARM_INITIAL_PEERS\n"
    unknown, _ = start_api("--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x", "--port", "0", "--model", str(unserved / "nope"))
    assert unknown.wait(60) == 2
    error = unknown.stderr.read()
    assert error.count("\n") == 1 and error.startswith("error: model") and "nope" in error, error

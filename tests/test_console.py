"""Seeing and talking to the swarm without code: peer metrics, swarm-chat, and the web console in a real browser.

One swarm of three peers (alpha 0:10 with --metrics-port, beta 10:20, gamma 20:30) serves every test;
the console's test runs last, since it stops gamma to watch the page notice.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pexpect
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import SwarmClient
from swarm.local_swarm import LocalSwarm
from tests.gateway_process import running_api

pytestmark = pytest.mark.slow  # starts peer processes

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"
NAMES = {"alpha": "0:10", "beta": "10:20", "gamma": "20:30"}
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory):
    local = LocalSwarm(tmp_path_factory.mktemp("console-logs"), ["--announce-period", "2"])
    try:
        local.add_together([["--blocks", "0:10", "--public-name", "alpha", "--metrics-port", "0"],
                            ["--blocks", "10:20", "--public-name", "beta"],
                            ["--blocks", "20:30", "--public-name", "gamma"]], ["alpha", "beta", "gamma"])
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def client(swarm: LocalSwarm):
    reference = SwarmClient(swarm.initial_peers)
    yield reference
    reference.close()


def scrape(url: str) -> dict[str, float]:
    """Every sample of the peer's metrics, by name and labels."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_peer_metrics_move_during_a_generation(swarm: LocalSwarm, client: SwarmClient) -> None:
    alpha = swarm.peers[0]
    assert alpha.metrics_url.startswith("http://127.0.0.1:") and alpha.metrics_url.endswith("/metrics")
    before = scrape(alpha.metrics_url)
    stream = client.start(messages=[{"role": "user", "content": "Write a long story about a dragon."}],
                          max_new_tokens=64)
    pieces = iter(stream)
    for _ in range(3):
        next(pieces)
    during = scrape(alpha.metrics_url)
    for _ in range(6):
        next(pieces)
    later = scrape(alpha.metrics_url)
    stream.close()
    assert during["swarm_peer_open_sessions"] == 1 and before["swarm_peer_open_sessions"] == 0
    assert before["swarm_peer_steps_total"] < during["swarm_peer_steps_total"] < later["swarm_peer_steps_total"]
    assert during["swarm_peer_passes_total"] > before["swarm_peer_passes_total"]
    for direction in ("in", "out"):
        key = f"swarm_peer_bytes_total{{direction={direction}}}"
        assert before.get(key, 0) < during[key] < later[key]
    assert during["swarm_peer_cache_tokens{state=used}"] > 0
    assert later["swarm_peer_pushes_total{direction=sent,result=accepted}"] > during.get(
        "swarm_peer_pushes_total{direction=sent,result=accepted}", 0)
    assert later["swarm_peer_step_duration_seconds_count"] > before.get("swarm_peer_step_duration_seconds_count", 0)
    assert later["swarm_peer_rows_per_pass_count"] == later["swarm_peer_passes_total"]
    not_found = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                alpha.metrics_url.replace("/metrics", "/other")], capture_output=True, text=True)
    assert not_found.stdout == "404"


def chat_command(swarm: LocalSwarm, *args: str) -> list[str]:
    return [sys.executable, "-m", "client.chat", "--initial-peers", swarm.initial_peers[0], *args]


def spawn_chat(swarm: LocalSwarm, *args: str) -> pexpect.spawn:
    """An interactive swarm-chat in a pty, as a person would run it."""
    command = chat_command(swarm, *args)
    return pexpect.spawn(command[0], command[1:], cwd=str(ROOT), encoding="utf-8", timeout=120,
                         env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})


def test_chat_one_question(swarm: LocalSwarm, client: SwarmClient) -> None:
    expected = client.generate(messages=[{"role": "user", "content": QUESTION}], max_new_tokens=24)
    plain = subprocess.run(chat_command(swarm, QUESTION, "--max-tokens", "24"), capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == expected + "\n" and "Paris" in expected
    as_json = subprocess.run(chat_command(swarm, QUESTION, "--max-tokens", "24", "--json"), capture_output=True,
                             text=True, timeout=120, cwd=ROOT)
    assert as_json.returncode == 0, as_json.stderr
    answer = json.loads(as_json.stdout)
    assert answer["answer"] == expected and answer["finish_reason"] in ("stop", "length")
    assert answer["completion_tokens"] > 0 and answer["sent_tokens"] == answer["prompt_tokens"]


def test_chat_exit_codes(swarm: LocalSwarm) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SWARM_INITIAL_PEERS"}
    no_swarm = subprocess.run([sys.executable, "-m", "client.chat", QUESTION], capture_output=True, text=True,
                              timeout=60, cwd=ROOT, env=env)
    assert no_swarm.returncode == 2 and "--initial-peers" in no_swarm.stderr
    unknown = subprocess.run(chat_command(swarm, QUESTION, "--model", "no-such-model"), capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
    assert unknown.returncode == 2 and "no-such-model" in unknown.stderr and "Traceback" not in unknown.stderr


def test_chat_keeps_one_session_across_turns(swarm: LocalSwarm) -> None:
    """Two turns through a pty: the second sends only its new tokens; /reset starts over; /exit leaves with 0."""
    chat = spawn_chat(swarm, "--max-tokens", "16", "--verbose")
    try:
        chat.expect("you> ")
        chat.sendline(QUESTION)
        chat.expect(r"sent (\d+) new tokens; the session holds (\d+)")
        first_sent, first_held = int(chat.match.group(1)), int(chat.match.group(2))
        assert "Paris" in chat.before
        chat.expect("you> ")
        chat.sendline("And of Germany?")
        chat.expect(r"sent (\d+) new tokens; the session holds (\d+)")
        second_sent, second_held = int(chat.match.group(1)), int(chat.match.group(2))
        assert first_sent < first_held <= first_sent + 16  # the whole first prompt, then the answer's tokens
        # the second prompt is the whole conversation, but only what follows the first answer is sent
        assert second_sent < 20 and second_held > first_held + second_sent, (first_sent, first_held, second_sent)
        chat.expect("you> ")
        chat.sendline("/reset")
        chat.expect("a new conversation")
        chat.expect("you> ")
        chat.sendline(QUESTION)
        chat.expect(r"sent (\d+) new tokens")
        assert int(chat.match.group(1)) == first_sent  # the same question, from an empty session
        chat.expect("you> ")
        chat.sendline("/exit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close()
    assert chat.exitstatus == 0


def test_chat_ctrl_c_stops_an_answer_not_the_chat(swarm: LocalSwarm) -> None:
    chat = spawn_chat(swarm, "--max-tokens", "400", "--verbose")
    try:
        chat.expect("you> ")
        chat.sendline("Write a very long story about a dragon.")
        chat.expect("assistant> ")
        time.sleep(2)  # some tokens in
        chat.sendintr()
        chat.expect(r"\[stopped\]", timeout=30)
        chat.expect("you> ")
        chat.sendline("What was it about?")  # the chat goes on, in the same session
        chat.expect("assistant> ")
        time.sleep(1)
        chat.sendintr()  # a second stop: no need to wait for 400 tokens
        chat.expect(r"\[stopped\]", timeout=30)
        chat.expect(r"sent (\d+) new tokens", timeout=30)
        assert int(chat.match.group(1)) < 40
        chat.expect("you> ")
        chat.sendeof()
        chat.expect(pexpect.EOF)
    finally:
        chat.close()
    assert chat.exitstatus == 0


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                    "(make test installs them as root)")
def test_console_in_a_browser(swarm: LocalSwarm, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with running_api("--initial-peers", swarm.initial_peers[0], "--log-level", "warning",
                     log=tmp_path / "swarm-api.log") as ready:
        page = ready.split()[1].removesuffix("/v1") + "/"
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1400,1300", f"--user-data-dir={tmp_path / 'chromium'}"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            browser.get(page)
            wait = WebDriverWait(browser, 60, poll_frequency=0.1)

            def peers() -> dict[str, str]:  # in one script: the page re-renders the table on every refresh
                rows = browser.execute_script(
                    "return [...document.querySelectorAll('tr.peer')].map(r => [r.dataset.peerName, r.dataset.span])")
                return dict(rows)

            wait.until(lambda _: peers() == NAMES)
            command = browser.find_element(By.CSS_SELECTOR, "pre.join-command").text
            assert command.startswith("swarm-serve --model smollm2-135m --initial-peers /ip4/127.0.0.1/")

            browser.find_element(By.ID, "question").send_keys(QUESTION)
            browser.find_element(By.ID, "max-tokens").clear()
            browser.find_element(By.ID, "max-tokens").send_keys("48")
            browser.find_element(By.ID, "send").click()
            answer = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".message.assistant"))
            lengths = []  # the answer's length as the page grows it
            deadline = time.monotonic() + 120
            while answer.get_attribute("data-ended") is None and time.monotonic() < deadline:
                lengths.append(len(answer.text))
                time.sleep(0.05)
            assert answer.get_attribute("data-ended") == "done", answer.text
            assert "Paris" in answer.text
            growing = sorted({n for n in lengths if 0 < n < len(answer.text)})
            assert len(growing) >= 3, f"the answer did not stream: lengths seen {growing}"

            steps = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#timeline .step"))
            assert len(steps) >= 5  # the prefill, then a decode step per token but the last
            for step in steps:
                hops = step.find_elements(By.CSS_SELECTOR, ".hop")
                assert [hop.text.split()[1] for hop in hops] == ["[0:10]", "[10:20]", "[20:30]"]
                assert all(hop.text.endswith(" ms") for hop in hops)
            browser.save_screenshot(str(tmp_path / "console.png"))
            if os.environ.get("SWARM_UPDATE_SCREENSHOTS"):
                shutil.copy(tmp_path / "console.png", ROOT / "docs" / "console.png")

            refresh = json.loads(urllib.request.urlopen(page + "console/info", timeout=10).read())["refresh_seconds"]
            assert swarm.peers[2].stop() == 0
            WebDriverWait(browser, refresh * 3, poll_frequency=0.1).until(lambda _: "gamma" not in peers())
            assert peers() == {"alpha": "0:10", "beta": "10:20"}
        finally:
            browser.quit()

// The swarm-llm console: reads /console/info and /health, chats through /v1/chat/completions, and shows
// each answer's per-hop timeline from /console/timeline/{id}. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];  // the chat so far, as OpenAI messages
let info = null;
let running = null;  // {controller, id} of the answer being streamed

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  for (const child of children) node.append(child);
  return node;
}

function headers() {
  const key = $("api-key").value;
  localStorage.setItem("swarm-api-key", key);
  return key ? { "Authorization": `Bearer ${key}` } : {};
}

// ---------------------------------------------------------------- the swarm

function coverageBar(model) {
  const bar = element("div", { class: "bar", title: "one cell per block: red nobody, yellow one peer, green more" });
  model.blocks.forEach((peers, block) => {
    const kind = peers.length === 0 ? "cover-0" : peers.length === 1 ? "cover-1" : "cover-many";
    bar.append(element("span", { class: kind, title: `block ${block}: ${peers.length} peers` }));
  });
  return bar;
}

function peerTable(model, peers) {
  const table = element("table", { class: "peers", "data-model": model.name });
  const head = element("tr");
  for (const name of ["name", "peer", "blocks", "state", "dtype", "steps/s", "cache left", "rtt"]) head.append(element("th", {}, name));
  table.append(head);
  for (const p of peers) {
    const row = element("tr", { class: "peer", "data-peer-name": p.public_name || "", "data-span": `${p.start}:${p.end}` });
    row.append(
      element("td", {}, p.public_name || "-"), element("td", { title: p.peer_id }, p.peer_id.slice(-8)),
      element("td", {}, `${p.start}:${p.end}`), element("td", { class: `state-${p.state}` }, p.state),
      element("td", {}, p.dtype), element("td", { class: "num" }, p.throughput.toFixed(1)),
      element("td", { class: "num" }, String(p.cache_tokens_left)),
      element("td", { class: "num" }, p.rtt_ms === null ? "-" : `${Math.round(p.rtt_ms)} ms`));
    table.append(row);
  }
  return table;
}

async function refreshSwarm() {
  try {
    const report = await (await fetch("/health")).json();
    const models = $("models");
    models.replaceChildren();
    for (const model of report.models || []) {
      const peers = (report.peers || []).filter((p) => p.dht_prefix === model.dht_prefix && p.state !== "offline");
      const verdict = model.covered ? "every block served" : `${model.uncovered.length} blocks served by nobody`;
      models.append(element("h3", {}, `${model.name} `, element("span", { class: "muted" }, `${model.num_blocks} blocks, ${verdict}`)),
                    coverageBar(model), peerTable(model, peers));
    }
    $("problems").textContent = (report.problems || []).join("; ");
    $("status").textContent = report.healthy ? "swarm healthy" : "swarm degraded";
  } catch (error) {
    $("status").textContent = `gateway unreachable: ${error}`;
  }
}

// ---------------------------------------------------------------- the chat

function addMessage(role, text) {
  const node = element("div", { class: `message ${role}` }, text);
  $("messages").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

async function* events(response) {
  // server-sent events: "data: <json>" lines separated by blank lines; "data: [DONE]" ends
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function ask(question) {
  conversation.push({ role: "user", content: question });
  addMessage("user", question);
  const answer = addMessage("assistant", "");
  answer.classList.add("streaming");
  const controller = new AbortController();
  running = { controller, id: null };
  $("send").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "answering…";
  const body = {
    model: $("model").value, messages: conversation, stream: true,
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  let ending = "done";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json", ...headers() },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error((await response.json()).error.message);
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      running.id = chunk.id;
      for (const choice of chunk.choices || []) answer.textContent += choice.delta.content || "";
    }
  } catch (error) {
    if (error.name === "AbortError") ending = "stopped";
    else { ending = "failed"; answer.classList.add("error"); answer.textContent += `\n[${error.message}]`; }
  }
  answer.classList.remove("streaming");
  answer.dataset.ended = ending;
  conversation.push({ role: "assistant", content: answer.textContent });
  $("status").textContent = `answer ${ending}`;
  $("send").disabled = false;
  $("stop").disabled = true;
  if (running.id) await showTimeline(running.id);
  running = null;
}

// ---------------------------------------------------------------- the timeline

async function showTimeline(id) {
  const response = await fetch(`/console/timeline/${encodeURIComponent(id)}`, { headers: headers() });
  if (!response.ok) return;
  const timeline = await response.json();
  const box = $("timeline");
  box.replaceChildren();
  for (const step of timeline.steps) {  // each row is one step, its hops in proportion to its own time
    const total = Math.max(step.hops.reduce((sum, h) => sum + h.ms, 0), 0.001);
    const hops = element("div", { class: "hops" });
    for (const hop of step.hops) {
      const label = `${hop.peer_id.slice(-8)} [${hop.start}:${hop.end}] ${hop.ms.toFixed(1)} ms`;
      hops.append(element("span", {
        class: "hop", title: `${label}${hop.by_push ? ", input pushed by the previous peer" : ""}`,
        style: `flex: 0 0 ${(100 * hop.ms / total).toFixed(2)}%`,
      }, label));
    }
    const what = step.positions > 1 ? `prefill ${step.positions}` : `step ${step.step}`;
    box.append(element("div", { class: "step", "data-trace-id": step.trace_id },
                       element("span", { class: "label" }, `${what}: ${total.toFixed(0)} ms`), hops));
  }
}

// ---------------------------------------------------------------- start

async function start() {
  info = await (await fetch("/console/info")).json();
  $("key-box").hidden = !info.api_key_required;
  $("api-key").value = localStorage.getItem("swarm-api-key") || "";
  for (const model of info.models) $("model").append(element("option", { value: model }, model));
  for (const [model, command] of Object.entries(info.join)) {
    const copy = element("button", { type: "button" }, "Copy");
    copy.addEventListener("click", () => navigator.clipboard.writeText(command));
    $("join-commands").append(element("h3", {}, model), element("pre", { class: "join-command" }, command), copy);
  }
  $("ask").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("question").value.trim();
    if (!question || running) return;
    $("question").value = "";
    ask(question);
  });
  $("stop").addEventListener("click", () => running && running.controller.abort());
  $("clear").addEventListener("click", () => { conversation.length = 0; $("messages").replaceChildren(); });
  await refreshSwarm();
  setInterval(refreshSwarm, info.refresh_seconds * 1000);
}

start();

"use strict";
// The playground: lists GET /models, then POSTs /generate with stream=true and reads the
// server-sent events from the response body (EventSource can only GET). Aborting the fetch
// disconnects, and the server cancels the generation.

const $ = (id) => document.getElementById(id);
const form = $("controls");
const modelSelect = $("model");
const output = $("output");
const temperature = $("temperature");

const FINISH = {
  length: "length (max characters)",
  stop: "stop string",
  time_limit: "time limit",
  cancelled: "cancelled",
  error: "error",
};

let models = new Map();  // name -> ModelInfo from GET /models
let controller = null;   // AbortController of the generation in flight

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// Error replies are {"error": {"type", "message"}}; anything else gets the HTTP status.
async function errorMessage(response) {
  try {
    const { error } = await response.json();
    if (error && error.message) return `${error.message} (${error.type}, HTTP ${response.status})`;
  } catch { /* not JSON */ }
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
}

function setStats({ finish, chars, rate, seed }) {
  $("stat-finish").textContent = finish;
  $("stat-chars").textContent = String(chars);
  $("stat-rate").textContent = Number.isFinite(rate) && chars > 0 ? rate.toFixed(0) : "–";
  $("stat-seed").textContent = seed;
  $("stats").hidden = false;
}

function describeModel(m) {
  const parts = [`${m.layers}×${m.units} ${m.cell}`, `${m.vocab_size} characters`];
  if (m.validation_loss_nats != null) parts.push(`${m.validation_loss_nats.toFixed(3)} nats/char`);
  if (m.lowercase) parts.push("lowercase: the seed is lowercased");
  return parts.join(" · ");
}

async function loadModels() {
  showError("");
  try {
    const response = await fetch("/models", { headers: headers() });
    if (response.status === 401) $("api-key-field").hidden = false;
    if (!response.ok) throw new Error(await errorMessage(response));
    const list = await response.json();
    models = new Map(list.models.map((m) => [m.name, m]));
    modelSelect.replaceChildren(...list.models.map(
      (m) => new Option(m.name, m.name, m.name === list.default, m.name === list.default)));
    modelSelect.disabled = false;
    $("generate").disabled = false;
    showModelInfo();
  } catch (err) {
    showError(`Could not load the models: ${err.message}`);
  }
}

function showModelInfo() {
  const m = models.get(modelSelect.value);
  $("model-info").textContent = m ? describeModel(m) : "";
}

// Seeds go up to 2^63, beyond the integers a JS number holds exactly, so they travel as
// digit strings. The page picks one when the field is empty, so even a stopped run has one.
function chosenSeed() {
  const typed = $("seed").value.trim();
  if (typed) return typed;
  return String(crypto.getRandomValues(new BigUint64Array(1))[0] >> 1n);
}

function requestBody(seed) {
  const maxChars = $("max-chars").value.trim();
  const body = JSON.stringify({
    model: modelSelect.value,
    seed_text: $("seed-text").value,
    temperature: Number(temperature.value),
    max_new_chars: maxChars === "" ? null : Number(maxChars),
    stream: true,
    details: true,
    resumable: true,
  });
  if (!/^\d+$/.test(seed)) throw new Error(`Random seed must be a whole number >= 0, got "${seed}"`);
  return `${body.slice(0, -1)},"seed":${seed}}`;
}

// Yields {event, data} for each server-sent event; comments (": ping") are keep-alives.
// The server separates events with "\n\n".
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

function visible(ch) {
  return { "\n": "↵", " ": "␣", "\t": "⇥" }[ch] ?? ch;
}

function percent(p) {
  return `${(p * 100).toFixed(p >= 0.1 ? 1 : 2)}%`;
}

function charSpan({ char, prob, top }) {
  const span = document.createElement("span");
  span.className = "gen";
  span.textContent = char;
  span.style.setProperty("--p", prob.toFixed(4));
  const alternatives = top.map((t) => `${visible(t.char)} ${percent(t.prob)}`).join("   ");
  span.title = `${visible(char)}  p = ${percent(prob)}\ntop: ${alternatives}`;
  return span;
}

function appendChunk(chunk) {
  const atBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 40;
  const fragment = document.createDocumentFragment();
  if (chunk.details) chunk.details.forEach((d) => fragment.append(charSpan(d)));
  else fragment.append(document.createTextNode(chunk.text));
  output.append(fragment);
  if (atBottom) output.scrollTop = output.scrollHeight;
  return chunk.details ? chunk.details.length : [...chunk.text].length;
}

// The handle of the last run that ended by length (or time): Continue goes on from it with no
// seed re-sent, exactly as one longer run would have.
let continuation = null;

function finishRun(summary, rawSummary, continuing) {
  const seed = rawSummary.match(/"seed":\s*(\d+)/)?.[1] ?? String(summary.seed);
  if (!continuing) output.querySelector(".seed").textContent = summary.seed_text;  // as the model saw it
  continuation = summary.continuation ?? null;
  const chars = summary.usage.generated_chars;
  setStats({
    finish: FINISH[summary.finish_reason] ?? summary.finish_reason,
    chars,
    rate: chars / (summary.timings.decode_ms / 1000),
    seed,
  });
  $("stat-rate").title = `first character after ${summary.timings.first_char_ms.toFixed(0)} ms, ` +
    `total ${summary.timings.total_ms.toFixed(0)} ms`;
  const note = summary.lowercased ? " The seed was lowercased for this model." : "";
  const failed = summary.finish_reason === "error";
  setStatus(failed ? "error" : "done", `${failed ? "Failed" : "Done"}: ${chars} characters.${note}`);
}

async function generate(event) {
  event.preventDefault();
  if (controller) return;
  showError("");
  $("stats").hidden = true;
  let seed, body;
  try {
    seed = chosenSeed();
    body = requestBody(seed);
  } catch (err) {
    showError(err.message);
    return;
  }
  const model = models.get(modelSelect.value);
  const seedText = $("seed-text").value;
  const seedSpan = document.createElement("span");
  seedSpan.className = "seed";
  seedSpan.textContent = model && model.lowercase ? seedText.toLowerCase() : seedText;
  output.replaceChildren(seedSpan);
  await run(body, seed, false);
}

async function continueRun() {
  if (controller || !continuation) return;
  showError("");
  const maxChars = $("max-chars").value.trim();
  const body = JSON.stringify({
    model: modelSelect.value,
    continuation,
    max_new_chars: maxChars === "" ? null : Number(maxChars),
    stream: true,
    details: true,
    resumable: true,
  });
  await run(body, $("stat-seed").textContent, true);
}

async function run(body, seed, continuing) {
  controller = new AbortController();
  continuation = null;
  $("generate").disabled = true;
  $("continue").disabled = true;
  $("stop").disabled = false;
  setStatus("running", `Generating with ${modelSelect.value}…`);
  const started = performance.now();
  let firstAt = null;
  let chars = 0;
  let finished = false;
  try {
    const response = await fetch("/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...headers() },
      body,
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const { event: type, data } of serverSentEvents(response.body)) {
      if (type === "error") {
        const { error } = JSON.parse(data);
        showError(`${error.message} (${error.type})`);
      } else if (type === "done") {
        finishRun(JSON.parse(data), data, continuing);
        finished = true;
      } else {
        firstAt ??= performance.now();
        chars += appendChunk(JSON.parse(data));
        $("status").textContent = `Generating with ${modelSelect.value}… ${chars} characters`;
      }
    }
    if (!finished) throw new Error("the connection closed before the generation finished");
  } catch (err) {
    if (err.name === "AbortError") {
      const seconds = (performance.now() - (firstAt ?? started)) / 1000;
      setStats({ finish: "stopped", chars, rate: chars / seconds, seed });
      setStatus("stopped", `Stopped after ${chars} characters.`);
    } else {
      showError(err.message);
      setStatus("error", "Failed.");
    }
  } finally {
    controller = null;
    $("generate").disabled = false;
    $("continue").disabled = !continuation;
    $("stop").disabled = true;
  }
}

function setTemperature(value) {
  temperature.value = value;
  $("temperature-value").value = Number(temperature.value).toFixed(2);
}

form.addEventListener("submit", generate);
$("stop").addEventListener("click", () => controller?.abort());
$("continue").addEventListener("click", continueRun);
modelSelect.addEventListener("change", showModelInfo);
$("api-key").addEventListener("change", loadModels);
temperature.addEventListener("input", () => setTemperature(temperature.value));
document.querySelectorAll(".ticks button").forEach(
  (b) => b.addEventListener("click", () => setTemperature(b.dataset.temp)));
$("seed-text").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit();
});
$("shade").addEventListener("change", (e) => {
  output.classList.toggle("shaded", e.target.checked);
  $("legend").hidden = !e.target.checked;
});

setTemperature(temperature.value);
loadModels();

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
    $("score").disabled = false;
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

// structured_outputs from the constraint box: a regex, or choices separated by "|".
function constraint() {
  const kind = $("constraint-kind").value;
  const text = $("constraint").value;
  if (!kind || !text) return null;
  return kind === "regex" ? { regex: text } : { choice: text.split("|") };
}

function requestBody(seed) {
  const maxChars = $("max-chars").value.trim();
  const structured = constraint();
  const body = JSON.stringify({
    model: modelSelect.value,
    seed_text: $("seed-text").value,
    temperature: Number(temperature.value),
    max_new_chars: maxChars === "" ? null : Number(maxChars),
    stream: true,
    details: true,
    // A constrained text cannot be continued: it ends when it is complete.
    resumable: structured === null,
    ...(structured && { structured_outputs: structured }),
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

// One element per grapheme cluster, what a reader sees as one character ("e" + U+0301, a
// family emoji of five code points, a flag of two, CRLF), shaded by the product of the
// probabilities of its code points. The server streams code points, and a cluster can
// straddle two events, so the last cluster stays open: the next chunk's first code points
// are segmented together with it, and its element is redrawn if they join it.
const graphemes = new Intl.Segmenter(undefined, { granularity: "grapheme" });
let openCluster = null;  // {span, chars, details} of the last cluster shown: it may still grow

// Controls and what else draws as nothing (or as an empty box): their standard abbreviations,
// in plain ASCII so that every font has them (U+2400's control pictures are missing from many).
const C0_NAMES = ("NUL SOH STX ETX EOT ENQ ACK BEL BS HT LF VT FF CR SO SI DLE DC1 DC2 DC3 " +
                  "DC4 NAK SYN ETB CAN EM SUB ESC FS GS RS US").split(" ");
const LABELS = { 0x7f: "DEL", 0x85: "NEL", 0x2028: "LS", 0x2029: "PS", 0x200d: "ZWJ",
                 0x200c: "ZWNJ", 0xfe0f: "VS16", 0xfe0e: "VS15", 0xfeff: "BOM" };
const LINE_BREAKS = new Set([0x85, 0x2028, 0x2029]);  // shown, then broken after, as they mean
const INVISIBLE = /^[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Default_Ignorable_Code_Point}]+$/u;

function codePoint(ch) {
  return `U+${ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}`;
}

// What one code point looks like in a tooltip.
function visible(ch) {
  const code = ch.codePointAt(0);
  if (ch === "\n") return "↵";
  if (ch === " ") return "␣";
  if (ch === "\t") return "⇥";
  if (code < 0x20) return C0_NAMES[code];
  if (code in LABELS) return LABELS[code];
  if (/^\p{M}/u.test(ch)) return `◌${ch}`;
  if (INVISIBLE.test(ch)) return codePoint(ch);
  return ch;
}

// What a cluster looks like in the output: {text, kind}; kind "" is text as it is.
function display(cluster) {
  if (cluster === "\n" || cluster === "\r\n") return { text: "\n", kind: "nl" };
  if (cluster === "\t") return { text: "\t", kind: "" };
  const code = cluster.codePointAt(0);
  if (code < 0x20) return { text: C0_NAMES[code], kind: "ctl" };  // a lone CR included
  if (LINE_BREAKS.has(code)) return { text: LABELS[code], kind: "ctl brk" };
  if (INVISIBLE.test(cluster)) return { text: [...cluster].map(visible).join(" "), kind: "ctl" };
  // A mark (or joiner) on nothing: drawn on a dotted circle, as fonts draw a lone mark.
  if (/^[\p{M}\p{Cf}\p{Default_Ignorable_Code_Point}]/u.test(cluster)) {
    return { text: `◌${cluster}`, kind: "" };
  }
  return { text: cluster, kind: "" };
}

function percent(p) {
  if (p > 0 && p < 1e-4) return `${(p * 100).toPrecision(2)}%`;
  return `${(p * 100).toFixed(p >= 0.1 ? 1 : 2)}%`;
}

function charLine({ char, prob, top }) {
  const alternatives = top.map((t) => `${visible(t.char)} ${percent(t.prob)}`).join("   ");
  return `${visible(char)} ${codePoint(char)}  p = ${percent(prob)}\ntop: ${alternatives}`;
}

function drawCluster(span, details, text) {
  const { text: shown, kind } = display(text);
  span.className = kind ? `gen ${kind}` : "gen";
  span.textContent = shown;
  span.dataset.text = text;
  if (!details.length) return;
  const prob = details.reduce((p, d) => p * d.prob, 1);
  span.style.setProperty("--p", prob.toFixed(4));
  span.title = details.length === 1 ? charLine(details[0])
    : `${shown}  p = ${percent(prob)}, the product of its ${details.length} characters:\n\n` +
      details.map(charLine).join("\n\n");
}

function appendChunk(chunk) {
  const atBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 40;
  // Per code point: its details, or none when the server sent text only.
  const details = chunk.details ?? [...chunk.text].map(() => null);
  const chars = chunk.details ? chunk.details.map((d) => d.char) : [...chunk.text];
  let pending = chars;
  let pendingDetails = details;
  let reopen = null;
  if (openCluster && openCluster.span.isConnected) {
    reopen = openCluster;
    pending = [...openCluster.chars, ...chars];
    pendingDetails = [...openCluster.details, ...details];
  }
  const fragment = document.createDocumentFragment();
  let at = 0;
  for (const { segment } of graphemes.segment(pending.join(""))) {
    const n = [...segment].length;
    const mine = pendingDetails.slice(at, at + n);
    const span = reopen && at === 0 ? reopen.span : document.createElement("span");
    drawCluster(span, mine.filter((d) => d), segment);
    if (span !== reopen?.span) fragment.append(span);
    openCluster = { span, chars: pending.slice(at, at + n), details: mine };
    at += n;
  }
  output.append(fragment);
  if (atBottom) output.scrollTop = output.scrollHeight;
  return chars.length;
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
  openCluster = null;  // a new text: nothing generated before can join its first cluster
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

// "Score this text": POST /score, then the text box's text drawn with the same clusters and
// shading as generated text, each character's probability the model's given everything before
// it (the first given a newline, as an empty seed starts).
async function scoreText() {
  if (controller) return;
  showError("");
  $("stats").hidden = true;
  const text = $("seed-text").value;
  if (!text) {
    showError("Type or paste the text to score in the seed text box.");
    return;
  }
  controller = new AbortController();
  $("generate").disabled = true;
  $("score").disabled = true;
  setStatus("running", `Scoring with ${modelSelect.value}…`);
  try {
    const response = await fetch("/score", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...headers() },
      body: JSON.stringify({ model: modelSelect.value, text, top: 5 }),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const result = await response.json();
    const details = result.logprobs.map((c) => ({
      char: c.char,
      prob: Math.exp(c.logprob),
      top: c.top.map((t) => ({ char: t.char, prob: Math.exp(t.logprob) })),
    }));
    output.replaceChildren();
    openCluster = null;
    appendChunk({ text: result.text, details });
    output.classList.add("shaded");
    $("shade").checked = true;
    $("legend").hidden = false;
    setStatus("done", `Scored ${result.chars} characters: ${result.bits_per_char.toFixed(3)} ` +
      `bits per character, perplexity ${result.perplexity.toFixed(2)}.`);
  } catch (err) {
    showError(err.message);
    setStatus("error", "Failed.");
  } finally {
    controller = null;
    $("generate").disabled = false;
    $("score").disabled = false;
  }
}

function setTemperature(value) {
  temperature.value = value;
  $("temperature-value").value = Number(temperature.value).toFixed(2);
}

form.addEventListener("submit", generate);
$("stop").addEventListener("click", () => controller?.abort());
$("constraint-kind").addEventListener("change", () => {
  $("constraint").disabled = !$("constraint-kind").value;
});
$("continue").addEventListener("click", continueRun);
$("score").addEventListener("click", scoreText);
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

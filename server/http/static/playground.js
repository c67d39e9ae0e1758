// charstream playground: the page's controls, its output and figures (api.js talks to the
// server). Server text goes into the page only as text nodes, never as markup.
import { Api, ApiError } from "/static/api.js";

const $ = (id) => document.getElementById(id);
const state = { session: null, controller: null, running: false, drawPending: false, figures: null };
const server = new Api(() => $("api-key").value);
const api = (...args) => server.call(...args);

// ---- settings ----

function numberOrText(id) {
  const text = $(id).value.trim();
  if (text === "") return undefined;
  const value = Number(text);
  return Number.isFinite(value) ? value : text; // the server names what is wrong with the text
}

function settings() {
  const fields = { max_chars: numberOrText("max-chars"), temperature: numberOrText("temperature"),
                   top_k: numberOrText("top-k"), top_p: numberOrText("top-p") };
  for (const name of Object.keys(fields)) if (fields[name] === undefined) delete fields[name];
  const stops = $("stops").value.split("\n").filter((line) => line !== "").map((line) => line.replace(/\\n/g, "\n"));
  if (stops.length) fields.stop = stops;
  return fields;
}

function seed() {
  const text = $("seed").value.trim();
  return text === "" ? {} : { seed: /^\d+$/.test(text) ? text : numberOrText("seed") }; // as text: 64 bits
}

const sessionMode = () => $("mode-session").checked;

// ---- output and figures ----

function clearOutput(echo) {
  $("output").replaceChildren();
  if (echo) addEcho(echo);
}

function addEcho(text) {
  const span = document.createElement("span");
  span.className = "echo";
  span.textContent = text;
  $("output").append(span);
}

function startGenerated() {
  const span = document.createElement("span");
  span.className = "gen";
  span.append(document.createTextNode(""));
  $("output").append(span);
  return span.firstChild;
}

function showError(error) {
  const box = $("error");
  box.replaceChildren();
  if (error === null) { box.hidden = true; return; }
  const strong = document.createElement("strong");
  if (error instanceof ApiError) {
    strong.textContent = error.code;
    box.append(strong, " " + error.message);
    if (error.status === 401) { box.append("\nEnter the server's API key at the top."); $("api-key").focus(); }
  } else {
    strong.textContent = "NETWORK";
    box.append(strong, " cannot reach the server (" + error.message + ")");
  }
  box.hidden = false;
  box.scrollIntoView({ block: "nearest" }); // on a narrow screen it may sit below the controls
}

function setStatus(text, stateName) {
  $("status").textContent = text;
  $("status").dataset.state = stateName;
}

function drawFigures() {
  state.drawPending = false;
  const f = state.figures;
  if (!f) return;
  $("count").textContent = String(f.count);
  if (f.first !== null) {
    $("ttfc").textContent = Math.round(f.first - f.start) + " ms";
    const seconds = (f.last - f.first) / 1000;
    $("rate").textContent = seconds > 0 ? Math.round((f.count - f.firstCount) / seconds).toLocaleString() : "–";
  }
}

function noteText(text) {
  const f = state.figures, now = performance.now();
  if (f.first === null) { f.first = now; f.firstCount = text.length; }
  f.count += text.length;
  f.last = now;
  if (!state.drawPending) { state.drawPending = true; requestAnimationFrame(drawFigures); }
}

// ---- streaming ----

function stream(body, node) {
  state.controller = new AbortController();
  return server.generate(body, state.controller.signal, (text) => {
    node.appendData(text);
    noteText(text);
    keepScrolled();
  });
}

function keepScrolled() {
  const out = $("output");
  if (out.scrollHeight - out.scrollTop - out.clientHeight < 80) out.scrollTop = out.scrollHeight;
}

async function run(task) { // one action at a time; errors shown, buttons locked meanwhile
  if (state.running) return;
  state.running = true;
  showError(null);
  lockButtons(true);
  try { await task(); } catch (error) {
    if (error.name === "AbortError") setStatus("stopped", "stopped"); else { setStatus("error", "error"); showError(error); }
  } finally {
    state.running = false;
    state.controller = null;
    lockButtons(false);
    drawFigures();
  }
}

function lockButtons(locked) {
  for (const button of document.querySelectorAll("button")) button.disabled = locked && button.id !== "stop";
  $("stop").disabled = !locked;
  $("import-file").disabled = locked;
}

async function generate() {
  const prompt = $("prompt").value, body = settings();
  state.figures = { start: performance.now(), first: null, firstCount: 0, last: 0, count: 0 };
  for (const id of ["ttfc", "rate"]) $(id).textContent = "–";
  $("count").textContent = "0";
  setStatus("streaming…", "streaming");
  $("output").scrollIntoView({ block: "nearest" }); // narrow screens: show where the text comes
  if (sessionMode()) {
    if (!state.session) { await createSession(prompt); } else if (prompt) { body.prompt = prompt; addEcho(prompt); }
    body.session_id = state.session;
    $("prompt").value = ""; // the session has it now: the next Generate continues
  } else {
    Object.assign(body, { prompt }, seed());
    clearOutput(prompt);
  }
  let last;
  try {
    last = await stream(body, startGenerated());
  } finally { // finished, stopped or failed: the session says what it kept
    if (sessionMode() && state.session) {
      await describeSession().catch(() => {});
      await listSessions().catch(() => {});
    }
  }
  setStatus(last.finish_reason.replace("FINISH_REASON_", "").toLowerCase() +
            (last.matched_stop ? " (" + JSON.stringify(last.matched_stop) + ")" : ""), "done");
}

// ---- sessions ----

async function createSession(prompt) {
  const fields = settings();
  delete fields.max_chars; delete fields.stop;
  const reply = await api("POST", "/v1/sessions", Object.assign({ prompt }, fields, seed()));
  await useSession(reply.session, prompt);
}

async function useSession(info, echo) {
  state.session = info ? info.session_id : null;
  clearOutput(echo);
  await listSessions();
  showSession(info);
}

function showSession(info, note) {
  $("session-info").textContent = info
    ? `${info.session_id.slice(0, 8)}…: ${info.consumed_chars} characters consumed, temperature ` +
      `${+info.temperature.toFixed(3)}, top-k ${info.top_k}, top-p ${+info.top_p.toFixed(3)}` +
      (info.busy ? ", busy" : "") + (note ? " — " + note : "")
    : note || "No session.";
}

async function describeSession(note) {
  showSession((await api("GET", "/v1/sessions/" + state.session)).session, note);
}

async function listSessions() {
  const select = $("session-select");
  const { sessions } = await api("GET", "/v1/sessions");
  const first = new Option(sessions.length ? "(choose a session)" : "(none yet: Generate or New creates one)", "");
  select.replaceChildren(first, ...sessions.map((s) => new Option(
    `${s.session_id.slice(0, 8)}… (${s.consumed_chars} chars)`, s.session_id)));
  select.value = state.session || "";
}

const needSession = () => { if (!state.session) throw new ApiError(0, "NO_SESSION", "create or choose a session first"); };

const actions = {
  "new-session": async () => { await createSession($("prompt").value); $("prompt").value = ""; },
  fork: async () => {
    needSession();
    const from = state.session, reply = await api("POST", `/v1/sessions/${from}:fork`);
    state.session = reply.session_id;
    await listSessions();
    showSession(reply.session, "forked from " + from.slice(0, 8) + "…");
  },
  reset: async () => {
    needSession();
    const prompt = $("prompt").value;
    const reply = await api("POST", `/v1/sessions/${state.session}:reset`, Object.assign({ prompt }, seed()));
    clearOutput(prompt);
    $("prompt").value = "";
    showSession(reply.session, "reset");
  },
  delete: async () => {
    needSession();
    await api("DELETE", "/v1/sessions/" + state.session);
    state.session = null;
    await listSessions();
    showSession(null, "Deleted.");
  },
  export: async () => {
    needSession();
    const blob = await (await api("POST", `/v1/sessions/${state.session}:export`, undefined, true)).blob();
    const link = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob),
      download: `session-${state.session.slice(0, 8)}.charstream` });
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  },
  "refresh-sessions": listSessions,
};

async function importFile(file) {
  const reply = await api("POST", "/v1/sessions:import", await file.arrayBuffer());
  await useSession(reply.session, reply.session.recent_text);
  showSession(reply.session, "imported from " + file.name + " (showing its recent text)");
}

async function chooseSession(id) {
  if (!id) return;
  state.session = id;
  const { session } = await api("GET", "/v1/sessions/" + id);
  clearOutput(session.recent_text);
  showSession(session, "showing its recent text");
}

// ---- start-up ----

async function describeModel() {
  try {
    const m = await api("GET", "/v1/model");
    $("model").textContent = `${m.num_layers}×${m.hidden_size} GRU, ${m.vocab_size} characters, ${m.variant} on ` +
      `${m.execution_provider.replace("ExecutionProvider", "")} · up to ${m.max_chars_limit.toLocaleString()} ` +
      "characters per call";
  } catch (error) {
    $("model").textContent = error.status === 401 ? "This server needs an API key: enter it on the right."
      : "Model unknown: " + error.message;
  }
}

function modeChanged() {
  const session = sessionMode();
  $("session-panel").hidden = !session;
  $("prompt-label").textContent = session ? "Text to add (sent before generating)" : "Prompt";
  if (session) run(listSessions);
}

document.addEventListener("DOMContentLoaded", () => {
  $("generate").addEventListener("click", () => run(generate));
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  for (const [id, action] of Object.entries(actions)) $(id).addEventListener("click", () => run(action));
  $("import-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    event.target.value = "";
    if (file) run(() => importFile(file));
  });
  $("session-select").addEventListener("change", (event) => run(() => chooseSession(event.target.value)));
  for (const id of ["mode-oneshot", "mode-session"]) $(id).addEventListener("change", modeChanged);
  $("api-key").addEventListener("change", describeModel);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); run(generate); }
    if (event.key === "Escape" && state.controller) state.controller.abort();
  });
  modeChanged();
  describeModel();
});

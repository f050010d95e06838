// comfy-embed playground: plain JS, no dependencies, talks to the public API only.
"use strict";

// Relative URLs: the page also works behind a proxy that serves it under a prefix.
const API = "api/serverless";
const $ = (id) => document.getElementById(id);
const ui = {
  key: $("api-key"), example: $("example"), file: $("file"), format: $("format"),
  editor: $("workflow"), validation: $("validation"), base64: $("opt-base64"), oss: $("opt-oss"),
  outFormat: $("opt-format"), quality: $("opt-quality"), run: $("run"), cancel: $("cancel"),
  lookupForm: $("lookup-form"), lookupId: $("lookup-id"), taskId: $("task-id"), state: $("state"),
  queue: $("queue"), node: $("node"), elapsed: $("elapsed"), progress: $("progress"),
  progressText: $("progress-text"), error: $("error"), seeds: $("seeds"), results: $("results"),
  events: $("events"), eventCount: $("event-count"),
  app: $("app"), appForm: $("app-form"), appFields: $("app-fields"),
};

// The task on screen: its id, the graph it ran (node names), timers, blob URLs.
let task = null;

// ------------------------------------------------------------------ helpers
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function newTaskId() {
  // crypto.randomUUID needs a secure context; getRandomValues does not.
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return "pg-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function authHeaders() {
  const key = ui.key.value.trim();
  return key ? { "Authorization": "Bearer " + key } : {};
}

function nodeLabel(id) {
  if (id === null || id === undefined) return "-";
  const node = task && task.graph && task.graph[id];
  if (!node) return `node ${id}`;
  const title = node._meta && node._meta.title;
  const kind = node.class_type || "?";
  return title && title !== kind ? `node ${id} (${kind}: ${title})` : `node ${id} (${kind})`;
}

// Seeds go up to 2^64: JSON numbers past 2^53 would lose digits in JS, and a
// seed that is off by a few cannot reproduce a run. Keep them as their text.
// With `marked`, such a number becomes BIG + digits, which pretty() writes
// back as a bare number.
const BIG = "@@int@@";
function parseJSON(text, marked = false) {
  return JSON.parse(text, (key, value, context) => {
    if (typeof value === "number" && !Number.isSafeInteger(value) && Number.isInteger(value)) {
      if (context && typeof context.source === "string") return (marked ? BIG : "") + context.source;
    }
    return value;
  });
}

// --------------------------------------------------------------- validation
function lineCol(text, pos) {
  const before = text.slice(0, pos);
  const line = before.split("\n").length;
  return { line, col: pos - before.lastIndexOf("\n") };
}

function jsonProblem(text, err) {
  const msg = String(err.message || err);
  const m = /position (\d+)/.exec(msg);
  if (m && !/line \d+/.test(msg)) {
    const { line, col } = lineCol(text, Number(m[1]));
    return `Not valid JSON: ${msg} (line ${line}, column ${col})`;
  }
  return `Not valid JSON: ${msg}`;
}

function isLink(v) {
  return Array.isArray(v) && v.length === 2 && (typeof v[0] === "string" || typeof v[0] === "number")
    && Number.isInteger(v[1]);
}

// Returns {graph, problems}: the checks a user can fix before sending;
// the server's validation (types, ranges, files) names the rest.
function checkWorkflow(text) {
  if (!text.trim()) return { graph: null, problems: ["Paste, drop or pick a workflow first."] };
  let graph;
  try { graph = parseJSON(text, true); } catch (e) { return { graph: null, problems: [jsonProblem(text, e)] }; }
  if (graph === null || typeof graph !== "object" || Array.isArray(graph)) {
    return { graph: null, problems: ["The workflow must be a JSON object of nodes: {\"3\": {\"class_type\": ..., \"inputs\": {...}}}."] };
  }
  // A saved (editor) workflow: the server converts it with its own node definitions.
  if (Array.isArray(graph.nodes)) return { graph, problems: [] };
  if (graph.prompt && typeof graph.prompt === "object" && !graph.prompt.class_type) {
    return { graph: null, problems: ["This looks like a /prompt request body: send only the object under \"prompt\"."] };
  }
  const problems = [];
  const ids = Object.keys(graph);
  if (!ids.length) problems.push("The workflow has no nodes.");
  for (const id of ids) {
    const node = graph[id];
    if (node === null || typeof node !== "object" || Array.isArray(node)) {
      problems.push(`node ${id}: must be an object with class_type and inputs`);
      continue;
    }
    if (typeof node.class_type !== "string" || !node.class_type) {
      problems.push(`node ${id}: class_type is missing`);
    }
    if (node.inputs !== undefined && (node.inputs === null || typeof node.inputs !== "object" || Array.isArray(node.inputs))) {
      problems.push(`node ${id} (${node.class_type}): inputs must be an object`);
      continue;
    }
    for (const [name, value] of Object.entries(node.inputs || {})) {
      if (isLink(value) && !(String(value[0]) in graph)) {
        problems.push(`node ${id} (${node.class_type}) input '${name}': links to node ${value[0]}, which is not in the workflow`);
      }
    }
  }
  return { graph, problems };
}

function showValidation() {
  const { graph, problems } = checkWorkflow(ui.editor.value);
  ui.validation.replaceChildren();
  ui.editor.setAttribute("aria-invalid", problems.length ? "true" : "false");
  if (problems.length) {
    ui.validation.className = "validation bad";
    if (problems.length === 1) ui.validation.textContent = problems[0];
    else ui.validation.append(el("ul", {}, ...problems.map((p) => el("li", { text: p }))));
  } else {
    const n = Object.keys(graph).length;
    ui.validation.className = "validation ok";
    ui.validation.textContent = `${n} node${n === 1 ? "" : "s"}, links resolve.`;
  }
  return { graph, problems };
}

let validateTimer = 0;
ui.editor.addEventListener("input", () => {
  clearTimeout(validateTimer);
  validateTimer = setTimeout(showValidation, 250);
});

// Two-space JSON, with short arrays (links such as ["4", 0]) kept on one line.
function pretty(value) {
  return JSON.stringify(value, null, 2).replace(/\[\n\s*([^\[\]{}]*?)\n\s*\]/g,
    (whole, inner) => (inner.length > 60 ? whole : "[" + inner.split(/,\n\s*/).join(", ") + "]"))
    .replace(new RegExp(`"${BIG}(-?\\d+)"`, "g"), "$1");
}

function setWorkflow(text) {
  try { text = pretty(parseJSON(text, true)); } catch (e) { /* keep as is: validation says why */ }
  ui.editor.value = text;
  showValidation();
}

// ----------------------------------------------------------------- examples
const examples = new Map();
async function loadExamples() {
  try {
    const r = await fetch("playground/examples");
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    for (const ex of (await r.json()).examples) {
      examples.set(ex.name, ex.workflow);
      ui.example.append(el("option", { value: ex.name, text: ex.name.replace(/_/g, " ") }));
    }
    if (!ui.editor.value.trim() && examples.has("text_to_image")) {
      ui.example.value = "text_to_image";
      setWorkflow(JSON.stringify(examples.get("text_to_image")));
    }
  } catch (e) {
    ui.validation.className = "validation bad";
    ui.validation.textContent = `Could not load the bundled examples: ${e.message}`;
  }
}
ui.example.addEventListener("change", () => {
  const wf = examples.get(ui.example.value);
  if (wf) setWorkflow(JSON.stringify(wf));
});
ui.format.addEventListener("click", () => setWorkflow(ui.editor.value));

async function readFile(file) {
  if (!file) return;
  if (file.size > 32 * 1024 * 1024) {
    ui.validation.className = "validation bad";
    ui.validation.textContent = `${file.name} is over 32 MB, the server's default body limit.`;
    return;
  }
  ui.example.value = "";
  setWorkflow(await file.text());
}
ui.file.addEventListener("change", () => readFile(ui.file.files[0]));
ui.editor.addEventListener("dragover", (e) => { e.preventDefault(); ui.editor.classList.add("dragging"); });
ui.editor.addEventListener("dragleave", () => ui.editor.classList.remove("dragging"));
ui.editor.addEventListener("drop", (e) => {
  ui.editor.classList.remove("dragging");
  if (e.dataTransfer && e.dataTransfer.files.length) {
    e.preventDefault();
    readFile(e.dataTransfer.files[0]);
  }
});

// ------------------------------------------------------------- task display
function setState(state, label) {
  ui.state.dataset.state = state;
  ui.state.textContent = label || state;
  const active = state === "submitting" || state === "queued" || state === "running" || state === "following";
  ui.cancel.disabled = !active || !task;
  ui.run.disabled = state === "submitting";
}

function tick() {
  if (!task || !task.started) return;
  const end = task.ended || performance.now();
  ui.elapsed.textContent = `${((end - task.started) / 1000).toFixed(1)} s`;
}

function resetTask(taskId, graph, state) {
  if (task) {
    clearInterval(task.timer);
    task.stopFollowing = true;
    for (const url of task.urls) URL.revokeObjectURL(url);
  }
  task = { id: taskId, graph, started: performance.now(), ended: 0, final: false, urls: [],
           lastId: 0, timer: setInterval(tick, 100), stopFollowing: false };
  ui.taskId.textContent = taskId;
  ui.queue.textContent = "-";
  ui.node.textContent = "-";
  ui.elapsed.textContent = "0.0 s";
  setProgress(0, 0);
  ui.error.hidden = true;
  ui.error.replaceChildren();
  ui.seeds.hidden = true;
  ui.seeds.replaceChildren();
  ui.results.replaceChildren();
  ui.events.replaceChildren();
  ui.eventCount.textContent = "0";
  setState(state);
}

function finish(state, label) {
  if (!task) return;
  task.ended = task.ended || performance.now();
  tick();
  clearInterval(task.timer);
  setState(state, label);
}

function setProgress(value, max) {
  const pct = max > 0 ? Math.round((100 * value) / max) : 0;
  ui.progress.value = pct;
  ui.progressText.textContent = max > 0 ? `${pct} % (${value}/${max})` : `${pct} %`;
}

function logEvent(ev) {
  let text = JSON.stringify(ev.data);
  if (text && text.length > 300) text = text.slice(0, 300) + "...";
  ui.events.append(el("li", {}, el("strong", { text: ev.type }), " " + (text || "")));
  ui.eventCount.textContent = String(ui.events.childElementCount);
}

function onEvent(ev) {
  if (!task || !ev || typeof ev.type !== "string") return;
  logEvent(ev);
  const d = ev.data || {};
  switch (ev.type) {
    case "status": {
      // ComfyUI's message: queue_remaining counts this task too.
      const q = d.status && d.status.exec_info ? d.status.exec_info.queue_remaining : undefined;
      if (q !== undefined) showQueued(q - 1);
      break;
    }
    case "queue":
      // comfy-embed's countdown: how many tasks are ahead, the running one included.
      showQueued(d.position);
      break;
    case "execution_start":
      ui.queue.textContent = "running";
      setState("running");
      break;
    case "execution_cached":
      if (d.nodes && d.nodes.length) ui.node.textContent = `cached: ${d.nodes.join(", ")}`;
      break;
    case "executing":
      if (d.node !== null && d.node !== undefined) {
        ui.node.textContent = nodeLabel(d.node);
        if (ui.state.dataset.state !== "running") setState("running");
      }
      break;
    case "progress":
      task.sawProgress = true;
      setProgress(d.value, d.max);
      if (d.node) ui.node.textContent = nodeLabel(d.node);
      break;
    case "execution_error":
      showError({ type: "execution_error", message: `${d.exception_type || "Error"}: ${d.exception_message || ""}`,
                  node_errors: d.node_id ? { [d.node_id]: { class_type: d.node_type, errors: [] } } : {} });
      break;
    case "serverless_api":
      onFinal(d);
      break;
    default:
      break;
  }
}

function showQueued(ahead) {
  if (task.final || ui.state.dataset.state === "running" || typeof ahead !== "number") return;
  ui.queue.textContent = ahead > 0 ? `${ahead} ahead` : "next";
  setState("queued");
}

function showError(error) {
  const kids = [el("h3", { text: `Error: ${error.type || "error"}` }), el("p", { text: error.message || "" })];
  const items = [];
  for (const [id, entry] of Object.entries(error.node_errors || {})) {
    const who = `node ${id} (${entry.class_type || (task && task.graph && task.graph[id] && task.graph[id].class_type) || "?"})`;
    const errs = entry.errors && entry.errors.length ? entry.errors : [{ message: "failed" }];
    for (const e of errs) {
      const input = e.extra_info && e.extra_info.input_name;
      const li = el("li", {}, el("strong", { text: who }));
      if (input) li.append(" input ", el("code", { text: input }));
      li.append(`: ${e.message || ""}`);
      if (e.details && e.details !== e.message) li.append(` (${e.details})`);
      items.push(li);
    }
  }
  if (items.length) kids.push(el("ul", {}, ...items));
  ui.error.replaceChildren(...kids);
  ui.error.hidden = false;
}

function onFinal(d) {
  task.final = true;
  if (d.seeds && Object.keys(d.seeds).length) showSeeds(d.seeds);
  const took = typeof d.execution_time === "number" ? ` in ${d.execution_time.toFixed(2)} s` : "";
  if (d.status === "success") {
    if (!task.sawProgress) setProgress(1, 1);  // no sampler: done is 100 %
    ui.node.textContent = "-";
    ui.queue.textContent = "done";
    showResults(d.results || []);
    finish("success", `success${took}`);
    return;
  }
  ui.queue.textContent = "-";
  const error = d.error || { type: "error", message: "the task failed" };
  showError(error);
  if (error.type === "execution_interrupted") finish("cancelled", "cancelled");
  else finish("error", `error (${error.type})`);
}

function showSeeds(seeds) {
  const list = Object.entries(seeds).map(([id, s]) => `${nodeLabel(id)}: ${s}`).join("; ");
  const kids = [el("span", { text: `Seeds used: ${list}` })];
  if (task.graph) {
    kids.push(el("button", { type: "button", class: "secondary", text: "Put them in the workflow",
      onclick: () => applySeeds(seeds) }));
  }
  ui.seeds.replaceChildren(...kids);
  ui.seeds.hidden = false;
}

// Reproduce a run: write the seeds it used over the -1 (random) values.
function applySeeds(seeds) {
  const { graph } = checkWorkflow(ui.editor.value);
  if (!graph) return;
  for (const [id, seed] of Object.entries(seeds)) {
    const inputs = graph[id] && graph[id].inputs;
    if (!inputs) continue;
    // Written as the exact digits (a JS number would round them).
    if ("seed" in inputs) inputs.seed = BIG + seed;
    else if ("noise_seed" in inputs) inputs.noise_seed = BIG + seed;
  }
  ui.editor.value = pretty(graph);
  showValidation();
}

function b64ToBlob(data, type) {
  const bin = atob(data);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Blob([bytes], { type });
}

function guessType(name) {
  const ext = (name.split(".").pop() || "").toLowerCase();
  return { png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", webp: "image/webp", gif: "image/gif",
           mp4: "video/mp4", webm: "video/webm", mov: "video/quicktime", mp3: "audio/mpeg",
           wav: "audio/wav", flac: "audio/flac", ogg: "audio/ogg", opus: "audio/opus" }[ext] || "application/octet-stream";
}

function showResults(results) {
  if (!results.length) {
    ui.results.append(el("p", { text: "The workflow finished with no output files." }));
  }
  for (const r of results) {
    const out = r.output || {};
    const comfy = out.comfy || {};
    const name = comfy.filename || `output-${r.node_id}-${r.index}`;
    const type = out.media_type || guessType(name);
    const remote = (out.oss && out.oss.url) || (out.s3 && out.s3.url) || "";
    let url = remote;
    if (out.base64 && out.base64.data) {
      url = URL.createObjectURL(b64ToBlob(out.base64.data, type));
      task.urls.push(url);
    }
    const caption = el("figcaption", {}, `${nodeLabel(r.node_id)} #${r.index}: `, el("code", { text: name }));
    const figure = el("figure", { "data-node": String(r.node_id) });
    if (url) {
      let media;
      if (type.startsWith("image/")) {
        media = el("img", { src: url, alt: `output ${r.index} of ${nodeLabel(r.node_id)}` });
        media.addEventListener("load", () => caption.append(` ${media.naturalWidth}x${media.naturalHeight}`), { once: true });
      } else if (type.startsWith("video/")) {
        media = el("video", { src: url, controls: "", loop: "" });
      } else if (type.startsWith("audio/")) {
        media = el("audio", { src: url, controls: "" });
      }
      if (media) figure.append(el("div", { class: "media" }, media));
      caption.append(el("a", { href: url, download: name, text: "download" }));
      if (remote && remote !== url) caption.append(el("a", { href: remote, target: "_blank", rel: "noopener", text: "signed link" }));
    } else {
      const where = [comfy.dir, comfy.subfolder, comfy.filename].filter(Boolean).join("/");
      caption.append(` saved on the server at ${where}; tick "inline in the answer" to see it here.`);
    }
    if (out.oss && out.oss.object) caption.append(` oss://${out.oss.bucket}/${out.oss.object}`);
    if (out.s3 && out.s3.key) caption.append(` s3://${out.s3.bucket}/${out.s3.key}`);
    figure.append(caption);
    ui.results.append(figure);
  }
}

// ------------------------------------------------------------------ running
function runParams() {
  const p = new URLSearchParams({ stream: "true" });
  if (ui.base64.checked) p.set("output_base64", "true");
  if (ui.oss.checked) p.set("output_oss", "true");
  if (ui.outFormat.value) p.set("output_format", ui.outFormat.value);
  if (ui.quality.value) p.set("quality", ui.quality.value);
  return p;
}

// SSE over fetch: EventSource cannot POST a body or send headers.
async function readSSE(body, onMessage) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let sep;
    while ((sep = /\r?\n\r?\n/.exec(buffer)) !== null) {
      const block = buffer.slice(0, sep.index);
      buffer = buffer.slice(sep.index + sep[0].length);
      const data = [];
      let id = null;
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        else if (line.startsWith("id:")) id = line.slice(3).trim();
      }
      if (data.length) {
        if (id !== null && task) task.lastId = Number(id) || task.lastId;
        onMessage(parseJSON(data.join("\n")));
      }
    }
  }
}

function needKey(status) {
  showError({ type: `http_${status}`, message: status === 401
    ? "This server requires an API key: enter it in the API key field above and try again."
    : "The API key was refused for this call." });
  ui.key.focus();
}

async function run() {
  const app = apps.get(ui.app.value);
  let graph = {}, url = `api/apps/${encodeURIComponent(ui.app.value)}?${runParams()}`, body;
  if (app) {
    body = JSON.stringify(appValues());
  } else {
    const checked = showValidation();
    if (checked.problems.length) { ui.editor.focus(); return; }
    graph = checked.graph;
    url = `${API}/run?${runParams()}`;
    body = ui.editor.value;  // the text as written: re-serialising would round seeds past 2^53
  }
  const id = newTaskId();
  resetTask(id, graph, "submitting");
  ui.lookupId.value = id;
  let resp;
  try {
    resp = await fetch(url, {
      method: "POST", body,
      headers: { "Content-Type": "application/json", "X-Task-Id": id, ...authHeaders() },
    });
  } catch (e) {
    showError({ type: "network", message: `Could not reach the server: ${e.message}` });
    finish("error", "error (network)");
    return;
  }
  if (task.id !== id) return;
  if (resp.status === 401 || resp.status === 403) { needKey(resp.status); finish("error", `error (HTTP ${resp.status})`); return; }
  setState("queued");
  const type = resp.headers.get("content-type") || "";
  try {
    if (type.includes("text/event-stream") && resp.body) {
      await readSSE(resp.body, (ev) => { if (task && task.id === id) onEvent(ev); });
    } else {
      const body = parseJSON(await resp.text());
      if (body && body.type === "serverless_api") onEvent(body);
      else showError({ type: `http_${resp.status}`, message: JSON.stringify(body) });
    }
  } catch (e) {
    // The stream broke (proxy, network): the task goes on; follow its log.
    if (task && task.id === id && !task.final) {
      logEvent({ type: "stream_lost", data: { message: String(e.message || e) } });
      await follow(id);
      return;
    }
  }
  if (task && task.id === id && !task.final) {
    await follow(id);
  }
}

async function fetchStatus(id, since) {
  const r = await fetch(`${API}/status?${new URLSearchParams({ task_id: id, since: String(since) })}`,
                        { headers: authHeaders() });
  if (r.status === 401 || r.status === 403) {
    needKey(r.status);  // says what to do; callers keep that message
    throw Object.assign(new Error(`HTTP ${r.status}`), { shown: true });
  }
  if (!r.ok) throw new Error(`HTTP ${r.status}`);
  return parseJSON(await r.text());
}

// Poll the status log until the final event: for a looked-up task, or one
// whose stream broke. Works against any instance sharing the log.
async function follow(id) {
  const me = task;
  setState(ui.state.dataset.state === "idle" ? "following" : ui.state.dataset.state);
  let quiet = 0;
  while (task === me && !me.final && !me.stopFollowing) {
    let events;
    try {
      events = await fetchStatus(id, me.lastId);
    } catch (e) {
      if (!e.shown) showError({ type: "status", message: `Could not read the task's status log: ${e.message}` });
      finish("error", "error (status)");
      return;
    }
    for (const ev of events) {
      if (typeof ev.id === "number") me.lastId = ev.id;
      onEvent(ev);
    }
    if (me.final) return;
    quiet = events.length ? 0 : quiet + 1;
    await new Promise((ok) => setTimeout(ok, Math.min(2000, 250 * (1 + quiet))));
  }
}

async function lookup(id) {
  id = id.trim();
  if (!id) { ui.lookupId.focus(); return; }
  resetTask(id, null, "following");
  ui.state.textContent = "replaying";
  let events;
  try {
    events = await fetchStatus(id, 0);
  } catch (e) {
    if (!e.shown) showError({ type: "status", message: `Could not read the task's status log: ${e.message}` });
    finish("error", "error (status)");
    return;
  }
  if (!events.length) {
    finish("unknown", "unknown: no events (not started, or another log)");
    return;
  }
  for (const ev of events) {
    if (typeof ev.id === "number") task.lastId = ev.id;
    onEvent(ev);
  }
  if (!task.final) await follow(id);
}

async function cancel() {
  if (!task) return;
  const id = task.id;
  ui.cancel.disabled = true;
  try {
    const r = await fetch(`${API}/cancel?${new URLSearchParams({ task_id: id })}`,
                          { method: "POST", headers: authHeaders() });
    if (r.status === 401 || r.status === 403) { needKey(r.status); return; }
    const body = await r.json().catch(() => ({}));
    logEvent({ type: "cancel", data: { http: r.status, ...body } });
    if (r.status === 200 || r.status === 202) {
      if (task && task.id === id && !task.final) ui.state.textContent = "cancelling";
    } else if (r.status === 404 && task && task.id === id && !task.final) {
      // Not queued yet (still validating): the stream ends on its own.
      ui.cancel.disabled = false;
    }
  } catch (e) {
    logEvent({ type: "cancel", data: { error: String(e.message || e) } });
    ui.cancel.disabled = false;
  }
}

ui.run.addEventListener("click", run);
ui.cancel.addEventListener("click", cancel);
ui.lookupForm.addEventListener("submit", (e) => { e.preventDefault(); lookup(ui.lookupId.value); });
document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); if (!ui.run.disabled) run(); }
  else if (e.key === "Escape" && !ui.cancel.disabled) { e.preventDefault(); cancel(); }
});

// The key stays for this browser tab only.
ui.key.value = sessionStorage.getItem("comfy-embed-key") || "";
ui.key.addEventListener("change", () => sessionStorage.setItem("comfy-embed-key", ui.key.value.trim()));

// ------------------------------------------------------------------- apps
// An app (GET api/apps) is run from a form built from its parameters' JSON
// Schema; the answer streams like any run.
const apps = new Map();

async function loadApps() {
  try {
    const r = await fetch("api/apps", { headers: authHeaders() });
    if (!r.ok) return;  // no apps, or a key is needed: the workflow editor still works
    for (const app of (await r.json()).apps) {
      apps.set(app.name, app);
      ui.app.append(el("option", { value: app.name,
                                   text: app.description ? `${app.name}: ${app.description}` : app.name }));
    }
  } catch (e) { /* the editor works without apps */ }
}

function appField(name, s) {
  const id = `app-param-${name}`;
  let input;
  if (s.enum) {
    input = el("select", { id });
    for (const c of s.enum) input.append(el("option", { value: String(c), text: String(c) }));
    if (s.default !== undefined) input.value = String(s.default);
  } else if (s.type === "boolean") {
    input = el("input", { id, type: "checkbox" });
    input.checked = Boolean(s.default);
  } else if (s.type === "integer" || s.type === "number") {
    input = el("input", { id, type: "number", step: s.type === "integer" ? "1" : "any" });
    if (s.minimum !== undefined) input.min = String(s.minimum);
    if (s.maximum !== undefined) input.max = String(s.maximum);
    if (s.default !== undefined && s.default !== null) input.value = String(s.default);
  } else {
    input = el(s.contentMediaType ? "input" : "textarea", { id, rows: "2" });
    if (s.contentMediaType) input.placeholder = "URL, oss://, base64, or pick a file";
    else if (s.default !== undefined && s.default !== null) input.value = String(s.default);
  }
  input.dataset.param = name;
  input.dataset.kind = s.enum ? "enum" : s.contentMediaType ? "image" : s.type;
  const label = el("label", { for: id, text: s.description ? `${name}: ${s.description}` : name });
  const field = el("div", { class: "field" }, label, input);
  if (s.contentMediaType) {  // a local file goes as base64
    const file = el("input", { type: "file", accept: "image/*", "aria-label": `${name} file` });
    file.addEventListener("change", () => {
      const f = file.files[0];
      if (!f) return;
      const reader = new FileReader();
      reader.onload = () => { input.value = String(reader.result).split(",", 2)[1] || ""; };
      reader.readAsDataURL(f);
    });
    field.append(file);
  }
  return field;
}

function renderAppForm() {
  const app = apps.get(ui.app.value);
  ui.appFields.replaceChildren();
  ui.appForm.hidden = !app;
  ui.editor.disabled = Boolean(app);
  if (!app) return;
  for (const [name, s] of Object.entries(app.schema.properties || {})) ui.appFields.append(appField(name, s));
}

function appValues() {
  const out = {};
  for (const input of ui.appFields.querySelectorAll("[data-param]")) {
    const name = input.dataset.param, kind = input.dataset.kind;
    const schema = apps.get(ui.app.value).schema.properties[name];
    if (kind === "boolean") out[name] = input.checked;
    else if (input.value === "") continue;  // the app's default
    else if (kind === "integer" || kind === "number") out[name] = Number(input.value);
    else if (kind === "enum") out[name] = schema.enum.find((c) => String(c) === input.value);
    else out[name] = input.value;
  }
  return out;
}
ui.app.addEventListener("change", renderAppForm);

loadExamples();
loadApps();

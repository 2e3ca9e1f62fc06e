// tunelab ui: one page, no libraries, nothing fetched from the network but this app's own API.
"use strict";

const view = document.getElementById("view");
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"];
let closeStreams = [];

// ---------- API ----------
function token() { return localStorage.getItem("tunelab-token") || ""; }

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    const key = prompt("This tunelab app needs its API key:");
    if (key) { localStorage.setItem("tunelab-token", key); return api(path, options); }
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || (body.detail && JSON.stringify(body.detail)) || response.statusText);
  return body;
}

function stream(path, handlers) {
  const url = token() ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token())}` : path;
  const source = new EventSource(url);
  const connection = document.getElementById("connection");
  source.onopen = () => { connection.textContent = "● live"; };
  source.onerror = () => { connection.textContent = "○ reconnecting"; };
  for (const [kind, handle] of Object.entries(handlers)) {
    source.addEventListener(kind, (event) => handle(JSON.parse(event.data)));
  }
  closeStreams.push(() => source.close());
  return source;
}

// ---------- small helpers ----------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined || value === "") return "—";
  if (typeof value === "number") {
    if (Number.isInteger(value)) return value.toLocaleString();
    return Math.abs(value) >= 1000 ? value.toFixed(0) : value.toPrecision(digits);
  }
  return String(value);
}

function seconds(value) {
  if (value === null || value === undefined) return "—";
  if (value < 90) return `${value.toFixed(0)} s`;
  if (value < 5400) return `${(value / 60).toFixed(1)} min`;
  return `${(value / 3600).toFixed(1)} h`;
}

// `runs=A&runs=B`: any folder name round-trips (`lr=1e-3,r=8` holds a comma); one value that is not the name of
// a run (`known`: a Set of names) is an older link's `A,B`.
function runsQuery(names) { return new URLSearchParams(names.map((n) => ["runs", n])).toString(); }
function runsOf(query, known) {
  const names = new URLSearchParams(query).getAll("runs");
  return (names.length === 1 && !known.has(names[0]) ? names[0].split(",") : names).filter(Boolean);
}

function statusBadge(status) { return h("span", { class: `status ${status}` }, status || "—"); }

// ---------- charts ----------
function lineChart(title, series, { width = 430, height = 220, logY = false } = {}) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  svg.setAttribute("role", "img"); svg.setAttribute("aria-label", title);
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    svg.append(el); return el;
  };
  const points = Object.values(series).flat();
  const pad = { left: 52, right: 10, top: 22, bottom: 26 };
  add("text", { x: pad.left, y: 14, "font-size": 12, "font-weight": 600 }, title);
  if (!points.length) {
    add("text", { x: width / 2, y: height / 2, "text-anchor": "middle", fill: "#9ca3af", "font-size": 12 }, "no points yet");
    return h("div", { class: "chart", "data-title": title, "data-points": 0 }, svg);
  }
  const ty = (y) => (logY ? Math.log10(Math.max(y, 1e-12)) : y);
  const xs = points.map((p) => p[0]); const ys = points.map((p) => ty(p[1]));
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const sx = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const sy = (y) => height - pad.bottom - ((ty(y) - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  add("line", { x1: pad.left, y1: height - pad.bottom, x2: width - pad.right, y2: height - pad.bottom, stroke: "#9ca3af" });
  add("line", { x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom, stroke: "#9ca3af" });
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + ((y1 - y0) * i) / 4; const y = height - pad.bottom - ((yv - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
    add("text", { x: pad.left - 4, y: y + 4, "text-anchor": "end", "font-size": 10, fill: "#6b7280" },
        fmt(logY ? 10 ** yv : yv, 3));
    add("line", { x1: pad.left, y1: y, x2: width - pad.right, y2: y, stroke: "#f3f4f6" });
  }
  for (let i = 0; i <= 4; i++) {
    const xv = x0 + ((x1 - x0) * i) / 4;
    add("text", { x: sx(xv), y: height - 8, "text-anchor": "middle", "font-size": 10, fill: "#6b7280" }, fmt(Math.round(xv)));
  }
  Object.entries(series).forEach(([name, pts], index) => {
    const color = COLORS[index % COLORS.length];
    if (pts.length === 1) add("circle", { cx: sx(pts[0][0]), cy: sy(pts[0][1]), r: 3, fill: color });
    else add("polyline", { points: pts.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "), fill: "none", stroke: color,
                           "stroke-width": 1.6 });
  });
  const legend = h("div", { class: "legend" },
    Object.keys(series).map((name, i) => h("span", { style: `color:${COLORS[i % COLORS.length]}` }, `■ ${name}`)));
  return h("div", { class: "chart", "data-title": title, "data-points": points.length }, svg, legend);
}

// ---------- runs table ----------
const COLUMNS = [
  ["name", "run"], ["status", "status"], ["model", "model"], ["method", "method"], ["objective", "objective"],
  ["data", "data"], ["steps", "steps", "num"], ["train_seconds", "time", "num"], ["eval_loss", "eval loss", "num"],
  ["metric_after", "task metric before → after", "num"], ["peak_memory_mb", "peak MB", "num"],
];
let sortKey = "updated"; let sortDown = true;

function renderRuns() {
  let rows = [];
  const selected = new Set();
  const filter = h("input", { placeholder: "filter: name, model, method, data…", size: 40, oninput: draw });
  const statusFilter = h("select", { onchange: draw }, ["", "running", "completed", "failed", "interrupted", "died",
                                                         "starting"].map((s) => h("option", { value: s }, s || "any status")));
  const compareButton = h("button", { disabled: true, onclick: () => { location.hash = `#/compare?${runsQuery([...selected])}`; } },
                          "Compare selected");
  const table = h("table", { id: "runs" });
  view.replaceChildren(h("h1", {}, "Runs"), h("div", { class: "filters" }, filter, statusFilter, compareButton), table);

  function draw() {
    const text = filter.value.toLowerCase();
    const shown = rows.filter((r) => (!statusFilter.value || r.status === statusFilter.value)
      && (!text || [r.name, r.model, r.method, r.objective, r.data].join(" ").toLowerCase().includes(text)));
    shown.sort((a, b) => {
      const [x, y] = [a[sortKey], b[sortKey]];
      const order = x === y ? 0 : x === null || x === undefined ? 1 : y === null || y === undefined ? -1 : x < y ? -1 : 1;
      return sortDown ? -order : order;
    });
    const head = h("tr", {}, h("th", {}, ""), COLUMNS.map(([key, label, cls]) => h("th", {
      class: cls, onclick: () => { sortDown = sortKey === key ? !sortDown : false; sortKey = key; draw(); },
    }, label + (sortKey === key ? (sortDown ? " ▼" : " ▲") : ""))));
    const body = shown.map((r) => h("tr", { "data-run": r.name },
      h("td", {}, h("input", { type: "checkbox", checked: selected.has(r.name), onchange: (e) => {
        e.target.checked ? selected.add(r.name) : selected.delete(r.name); compareButton.disabled = selected.size < 2; } })),
      h("td", {}, h("a", { href: `#/run/${encodeURIComponent(r.name)}` }, r.name)),
      h("td", {}, statusBadge(r.status)), h("td", {}, r.model || "—"), h("td", {}, r.method || "—"),
      h("td", {}, r.objective || "—"), h("td", { class: "muted" }, r.data || "—"), h("td", { class: "num" }, fmt(r.steps)),
      h("td", { class: "num" }, seconds(r.train_seconds)), h("td", { class: "num" }, fmt(r.eval_loss)),
      h("td", { class: "num" }, r.metric ? `${r.metric}: ${fmt(r.metric_before, 3)} → ${fmt(r.metric_after, 3)}` : "—"),
      h("td", { class: "num" }, fmt(r.peak_memory_mb))));
    table.replaceChildren(head, ...(body.length ? body : [h("tr", {}, h("td", { colspan: 12, class: "muted" },
      "no runs here yet: start one, or point `tunelab ui --runs` at a folder of runs"))]));
  }
  stream("/api/events", { runs: (data) => { rows = data; draw(); } });
  api("/api/runs").then((data) => { rows = data; draw(); }).catch(showError);
}

// ---------- one run ----------
function renderRun(name) {
  const records = [];
  const header = h("div");
  const charts = h("div", { class: "charts", id: "charts" });
  const logBox = h("pre", { id: "log" });
  const errorBox = h("div");
  const details = h("div");
  view.replaceChildren(header, errorBox, h("h2", {}, "Curves"), charts, h("h2", {}, "Log"), logBox, details);

  function drawHeader(run) {
    const live = run.status === "running" || run.status === "starting";
    const act = (path, label) => h("button", { onclick: async (e) => {
      e.target.disabled = true;
      try { await api(`/api/runs/${encodeURIComponent(name)}/${path}`, { method: "POST" }); } catch (err) { showError(err); }
    } }, label);
    header.replaceChildren(
      h("h1", {}, name, " ", statusBadge(run.status)),
      h("div", { class: "toolbar" },
        live ? act("stop", "Stop (save a checkpoint)") : null,
        !live && run.checkpoints && run.checkpoints.length && run.status !== "completed" ? act("resume", "Resume") : null,
        run.has_report ? h("a", { href: `/api/runs/${encodeURIComponent(name)}/report${token() ? `?token=${token()}` : ""}`,
                                   target: "_blank" }, "Report") : null,
        h("a", { href: `#/chat/${encodeURIComponent(name)}` }, "Chat"),
        h("span", { class: "muted" }, `${run.model || ""} · ${run.method || ""} · ${run.objective || ""} · step ${fmt(run.steps)}`)));
    errorBox.replaceChildren(run.error ? h("div", { class: "error", id: "run-error" }, run.error) : "");
  }

  function drawCharts() {  // loss, eval loss and lr first, then every other number the run logs (task and objective metrics)
    const skip = new Set(["step", "epoch", "tokens"]);
    const found = new Set();
    for (const r of records) for (const k of Object.keys(r)) if (typeof r[k] === "number" && !skip.has(k)) found.add(k);
    const keys = ["loss", "eval_loss", "lr", ...[...found].filter((k) => !["loss", "eval_loss", "lr"].includes(k)).sort()];
    charts.replaceChildren(...keys.map((key) => lineChart(key,
      { [key]: records.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]) })));
  }

  let shownStatus = null;
  const loadDetails = () => api(`/api/runs/${encodeURIComponent(name)}`).then((run) => {
    drawHeader(run);
    shownStatus = run.status;
    details.replaceChildren(
      h("h2", {}, "Config"), h("pre", { id: "config" }, run.config_yaml || ""),
      run.data_stats ? h("h2", {}, "Data") : "", run.data_stats ? h("pre", {}, JSON.stringify(run.data_stats, null, 2)) : "",
      run.summary && Object.keys(run.summary).length ? h("h2", {}, "Summary") : "",
      run.summary && Object.keys(run.summary).length ? h("pre", {}, JSON.stringify(run.summary, null, 2)) : "");
  }).catch(showError);
  loadDetails();
  drawCharts();
  stream(`/api/runs/${encodeURIComponent(name)}/events`, {
    metrics: (data) => { if (data.reset) records.length = 0; records.push(...data.records); drawCharts(); },
    run: (run) => {
      drawHeader({ ...run, checkpoints: run.checkpoints || [1] });
      if (shownStatus !== null && run.status !== shownStatus) loadDetails();  // config, summary, report link
    },
    log: (data) => {
      logBox.textContent = data.text || "(no log yet: a run writes train.log once its directory exists; runs from "
        + "older tunelab versions have none)";
      logBox.scrollTop = logBox.scrollHeight;
    },
  });
}

// ---------- start a run ----------
async function renderNew() {
  const schema = await api("/api/schema");
  const resolve = (node) => (node && node.$ref ? schema.$defs[node.$ref.split("/").pop()] : node);
  const values = {};
  const yamlBox = h("textarea", { rows: 22, id: "config-yaml", spellcheck: "false" });
  const nameBox = h("input", { id: "run-name", value: `run-${new Date().toISOString().slice(5, 16).replace(/[-T:]/g, "")}` });
  const result = h("div", { id: "check-result" });
  const sections = h("div");

  function fieldFor(path, prop, required) {
    const node = resolve(prop);
    const choices = node.enum || (node.anyOf || []).flatMap((o) => resolve(o).enum || []);
    const type = node.type || (node.anyOf || []).map((o) => resolve(o).type).find((t) => t && t !== "null");
    const id = `f-${path.join("-")}`;
    let input;
    if (choices.length) input = h("select", { id }, h("option", { value: "" }, "(default)"), choices.map((c) => h("option", { value: c }, c)));
    else if (type === "boolean") input = h("select", { id }, ["", "true", "false"].map((c) => h("option", { value: c }, c || "(default)")));
    else input = h("input", { id, type: type === "number" || type === "integer" ? "number" : "text", step: "any",
                              placeholder: prop.default !== undefined ? JSON.stringify(prop.default) : "" });
    input.addEventListener("input", () => { setValue(path, input.value, type); writeYaml(); });
    input.addEventListener("change", () => { setValue(path, input.value, type); writeYaml(); });
    return h("label", { class: "field" }, h("span", {}, path[path.length - 1]), input,
             (prop.description || node.description) ? h("small", {}, (prop.description || node.description).split("\n")[0]) : "");
  }

  function setValue(path, raw, type) {
    let target = values;
    for (const part of path.slice(0, -1)) target = target[part] = target[part] || {};
    const key = path[path.length - 1];
    if (raw === "") delete target[key];
    else target[key] = type === "number" || type === "integer" ? Number(raw) : type === "boolean" ? raw === "true" : raw;
  }

  function section(name, node) {
    const resolved = resolve(node);
    const box = h("fieldset", {}, h("legend", {}, name));
    if (node.oneOf && node.discriminator) {  // method / objective: pick the kind, then its fields
      const variants = node.discriminator.mapping;
      const pick = h("select", { id: `f-${name}-name` }, Object.keys(variants).map((v) => h("option", { value: v }, v)));
      const fields = h("div");
      const show = () => {
        values[name] = { name: pick.value };
        const variant = schema.$defs[variants[pick.value].split("/").pop()];
        fields.replaceChildren(...Object.entries(variant.properties).filter(([k]) => k !== "name")
          .filter(([, p]) => simple(p)).map(([k, p]) => fieldFor([name, k], p)));
        writeYaml();
      };
      pick.value = (node.default && node.default.name) || Object.keys(variants)[0];
      pick.addEventListener("change", show);
      box.append(h("label", { class: "field" }, h("span", {}, "name"), pick), fields);
      show();
      return box;
    }
    if (resolved.properties) {
      for (const [key, prop] of Object.entries(resolved.properties)) if (simple(prop)) box.append(fieldFor([name, key], prop));
    } else box.append(fieldFor([name], node));
    return box;
  }

  function simple(prop) {  // a field a text box or a menu can hold (data.train: a path here; lists in the YAML)
    const node = resolve(prop);
    const scalar = (r) => ["string", "number", "integer", "boolean"].includes(r.type) || Boolean(r.enum);
    return scalar(node) || (node.anyOf || []).some((o) => scalar(resolve(o)));
  }

  function writeYaml() { yamlBox.value = toYaml(values); }

  for (const [name, prop] of Object.entries(schema.properties)) if (name !== "output_dir" && name !== "track") sections.append(section(name, prop));
  const upload = h("input", { type: "file", accept: ".yaml,.yml", onchange: async (e) => {
    const file = e.target.files[0]; if (file) yamlBox.value = await file.text(); } });
  const check = h("button", { id: "check", onclick: async () => {
    result.replaceChildren(h("p", { class: "muted" }, "checking the config, inspecting the data, checking the template, estimating memory…"));
    try { showCheck(result, await api("/api/check", { method: "POST", body: JSON.stringify({ config_yaml: yamlBox.value }) })); }
    catch (err) { result.replaceChildren(h("div", { class: "error" }, err.message)); }
  } }, "Check");
  const start = h("button", { class: "primary", id: "start", onclick: async () => {
    try {
      await api("/api/runs", { method: "POST", body: JSON.stringify({ name: nameBox.value, config_yaml: yamlBox.value }) });
      location.hash = `#/run/${encodeURIComponent(nameBox.value)}`;
    } catch (err) { result.replaceChildren(h("div", { class: "error", id: "start-error" }, err.message)); }
  } }, "Start");
  view.replaceChildren(h("h1", {}, "Start a run"),
    h("div", { class: "form" }, sections,
      h("div", {}, h("label", { class: "field" }, h("span", {}, "run name"), nameBox),
        h("p", { class: "muted" }, "The YAML below is what starts (edit it, paste one, or load a file): the same config `tunelab train` reads."),
        upload, yamlBox, h("div", { class: "toolbar" }, check, start), result)));
  writeYaml();
}

function showCheck(box, report) {
  if (!report.ok) { box.replaceChildren(h("div", { class: "error", id: "check-error" }, report.error)); return; }
  const parts = [h("p", { class: "ok" }, `config valid: ${report.model} · ${report.method} · ${report.objective}`)];
  const inspect = report.inspect || {};
  if (inspect.error) parts.push(h("div", { class: "error" }, `data: ${inspect.error}`));
  else for (const file of inspect.files || []) {
    parts.push(h("p", {}, `data ${file.path || file.name || ""}: ${fmt(file.rows)} rows, ${fmt(file.invalid_rows || 0)} invalid, format ${file.format || "?"}`));
  }
  const template = report.template || {};
  if (template.error) parts.push(h("div", { class: "error" }, `template: ${template.error}`));
  else if (template.skipped) parts.push(h("p", { class: "muted" }, template.skipped));
  else parts.push(h("p", { class: template.ok ? "ok" : "error" }, `template check: ${template.ok ? "PASS" : "FAIL"}`));
  const plan = report.plan || {};
  if (plan.error) parts.push(h("div", { class: "error" }, `dry run: ${plan.error}`));
  else if (plan.steps_planned) {
    const m = plan.memory_estimate || {};
    parts.push(h("p", { id: "plan" }, `${fmt(plan.steps_planned)} steps; estimated peak memory ${fmt(plan.peak_memory_estimate_mb)} MB `
      + `(model ${fmt(m.resident_mb)}, optimizer and gradients ${fmt((m.optimizer_mb || 0) + (m.gradients_mb || 0))}, `
      + `activations ${fmt(m.activations_mb)}) on ${plan.device}, ${plan.precision}; `
      + `${fmt(plan.trainable_parameters)} trainable parameters`));
  }
  parts.push(h("details", {}, h("summary", {}, "full report"), h("pre", {}, JSON.stringify(report, null, 2))));
  box.replaceChildren(...parts);
}

function toYaml(value, indent = "") {
  return Object.entries(value).map(([key, v]) => (v && typeof v === "object" && !Array.isArray(v)
    ? `${indent}${key}:\n${toYaml(v, indent + "  ")}` : `${indent}${key}: ${JSON.stringify(v)}`)).join("\n") + (indent ? "" : "\n");
}

// ---------- compare ----------
async function renderCompare(query) {
  const runs = await api("/api/runs");
  const names = runsOf(query, new Set(runs.map((r) => r.name)));
  if (names.length < 2) {
    const picks = runs.map((r) => h("label", { style: "display:block" }, h("input", { type: "checkbox", value: r.name }), ` ${r.name}`));
    view.replaceChildren(h("h1", {}, "Compare runs"), ...picks, h("button", { class: "primary", onclick: () => {
      const chosen = picks.map((p) => p.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
      location.hash = `#/compare?${runsQuery(chosen)}`;
    } }, "Compare"));
    return;
  }
  const data = await api(`/api/compare?${runsQuery(names)}`);
  const keys = [...new Set(Object.values(data.curves).flatMap((c) => Object.keys(c)))];
  const charts = keys.map((key) => lineChart(key, Object.fromEntries(names.map((n) => [n, (data.curves[n] || {})[key] || []]))));
  const diff = h("table", { class: "diff", id: "config-diff" }, h("tr", {}, h("th", {}, "config key"), names.map((n) => h("th", {}, n))),
    data.config_differences.map((row) => h("tr", {}, h("td", {}, row.key), row.values.map((v) => h("td", { class: "changed" }, fmt(v))))));
  const numbers = h("table", { id: "numbers" }, h("tr", {}, h("th", {}, ""), names.map((n) => h("th", { class: "num" }, n))),
    data.numbers.map((row) => h("tr", {}, h("td", {}, row.name), row.values.map((v) => h("td", { class: "num" }, fmt(v))))));
  view.replaceChildren(h("h1", {}, `Compare: ${names.join(" · ")}`), h("div", { class: "charts" }, charts),
    h("h2", {}, `Config differences (${data.config_same} keys the same)`), diff, h("h2", {}, "Before / after"), numbers);
}

// ---------- chat ----------
async function postStream(path, body, onEvent) {
  // EventSource only GETs; a chat message is a POST, so its server-sent events are read from the body here.
  const headers = { "Content-Type": "application/json" };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
  if (!response.ok) throw new Error((await response.json().catch(() => ({}))).error || response.statusText);
  const reader = response.body.getReader(); const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      const kind = (block.match(/^event: (.*)$/m) || [])[1]; const data = (block.match(/^data: (.*)$/m) || [])[1];
      if (kind && data) onEvent(kind, JSON.parse(data));
    }
  }
}

async function renderChat(name) {
  const runs = await api("/api/runs");
  const against = h("select", { id: "against" }, h("option", { value: "base" }, "its base model"),
    h("option", { value: "" }, "nothing (this run alone)"),
    runs.filter((r) => r.name !== name && r.status === "completed").map((r) => h("option", { value: r.name }, `run ${r.name}`)));
  const history = [];
  const columns = h("div", { class: "form", id: "chat" });
  const input = h("textarea", { rows: 3, id: "chat-input", placeholder: "your message (Enter sends, Shift+Enter breaks the line)" });
  const send = h("button", { class: "primary", id: "send" }, "Send");
  const gallery = h("div", { id: "gallery" });
  const errorBox = h("div");

  function drawHistory(pending) {
    const side = (key, title) => h("div", {}, h("h2", {}, title),
      [...history, ...(pending ? [pending] : [])].map((turn) => h("div", {},
        h("p", {}, h("strong", {}, "you: "), turn.user),
        h("pre", { class: `reply-${key}` }, turn[key] || "…"))));
    columns.replaceChildren(side("run", `${name}`), side("against", against.value ? `${against.selectedOptions[0].textContent}` : "—"));
  }

  async function submit() {
    const text = input.value.trim(); if (!text) return;
    input.value = ""; send.disabled = true; errorBox.replaceChildren();
    const turn = { user: text, run: "", against: "" };
    const messages = history.flatMap((t) => [{ role: "user", content: t.user }, { role: "assistant", content: t.run }]);
    messages.push({ role: "user", content: text });
    try {
      await postStream(`/api/runs/${encodeURIComponent(name)}/chat`, { messages, against: against.value || null }, (kind, data) => {
        if (kind === "token") { turn[data.side] += data.text; drawHistory(turn); }
        if (kind === "error") errorBox.replaceChildren(h("div", { class: "error" }, data.message));
      });
      history.push(turn);
    } catch (err) { errorBox.replaceChildren(h("div", { class: "error" }, err.message)); }
    send.disabled = false; drawHistory();
  }
  send.addEventListener("click", submit);
  input.addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); submit(); } });
  against.addEventListener("change", () => drawHistory());
  view.replaceChildren(h("h1", {}, `Chat: ${name}`), h("div", { class: "toolbar" }, "next to ", against), errorBox, columns,
                       input, h("div", { class: "toolbar" }, send), h("h2", {}, "Held-out samples: base and fine-tuned replies"), gallery);
  drawHistory();
  const samples = await api(`/api/runs/${encodeURIComponent(name)}/samples`);
  gallery.replaceChildren(samples.length ? h("table", {}, h("tr", {}, h("th", {}, "prompt"), h("th", {}, "reference"),
      h("th", {}, "base model"), h("th", {}, "fine-tuned")),
    samples.map((s) => h("tr", {}, h("td", {}, (s.prompt || []).map((m) => m.content).join("\n")), h("td", {}, s.reference || ""),
      h("td", {}, s.base || ""), h("td", {}, s.fine_tuned || "")))) : h("p", { class: "muted" }, "this run kept no held-out samples"));
}

// ---------- routing ----------
function showError(err) { view.prepend(h("div", { class: "error" }, err.message || String(err))); }

function route() {
  closeStreams.forEach((close) => close()); closeStreams = [];
  const [path, query] = location.hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  try {
    if (parts[0] === "run" && parts[1]) renderRun(parts[1]);
    else if (parts[0] === "new") renderNew().catch(showError);
    else if (parts[0] === "compare") renderCompare(query || "").catch(showError);
    else if (parts[0] === "chat" && parts[1]) renderChat(parts[1]).catch(showError);
    else renderRuns();
  } catch (err) { showError(err); }
}

window.addEventListener("hashchange", route);
route();

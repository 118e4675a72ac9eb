// streamguard console: an operator's view built only on the public /v1 API.
//
// Safe by construction: every string that comes from the API (ids, URLs,
// metadata, names, messages) reaches the page through textContent or a
// same-origin /media path, never as HTML markup; the API key lives in
// sessionStorage and travels only in the Authorization header. Live parts
// (alerts, lists, records) are polled; nothing needs a reload.

const KEY_STORE = "streamguard.apiKey";
const SEVERITY_RANK = { low: 1, medium: 2, high: 3, critical: 4 };
const TIMELINE_MAX = 720; // segments drawn (the newest); older ones stay in the records API
const ALERTS_SHOWN = 50;
const POLL = { alerts: 1000, item: 2000, lists: 3000, deliveries: 5000 };

const $ = (sel) => document.querySelector(sel);

// --- small DOM helpers: text only ---------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child); // strings become text nodes
  }
  return node;
}

function say(message, isError = false) {
  const status = $("#status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

// A /media path on this origin for a URL the API gave, or null (never another origin).
function mediaPath(url) {
  if (!url) return null;
  try {
    const path = new URL(url, location.href).pathname;
    return path.startsWith("/media/") ? path : null;
  } catch {
    return null;
  }
}

const fmt = (n, digits = 2) => Number(n).toFixed(digits);

// --- the API ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const key = sessionStorage.getItem(KEY_STORE);
  const headers = { Authorization: `Bearer ${key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" });
  const text = await resp.text();
  const doc = text ? JSON.parse(text) : null;
  if (!resp.ok) {
    if (resp.status === 401) signOut("Your API key was refused; sign in again.");
    throw new ApiError(resp.status, doc && doc.error ? doc.error.message : `HTTP ${resp.status}`);
  }
  return doc && "data" in doc ? doc.data : doc;
}

// --- state --------------------------------------------------------------------------------

const state = {
  selected: null, // {kind: "stream" | "job", id}
  item: null, // the selected task or job as last read
  records: [], // its status-0/-1 records, in segment order
  recordsAfter: -1,
  alertsAfter: 0,
  alerts: [], // newest first
  hls: null,
  playlist: null, // the path loaded in the player
  current: null, // the segment last sought to
  timers: [],
  generation: 0, // bumps on every selection: late replies for an old one are dropped
};

// --- sign in / out ------------------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  const input = $("#key");
  sessionStorage.setItem(KEY_STORE, input.value.trim());
  input.value = "";
  try {
    await start();
  } catch (err) {
    sessionStorage.removeItem(KEY_STORE);
    $("#signin-error").textContent = err.message;
  }
}

function signOut(message = "") {
  sessionStorage.removeItem(KEY_STORE);
  for (const t of state.timers) clearInterval(t);
  state.timers = [];
  select(null);
  $("#app").hidden = true;
  $("#signout").hidden = true;
  $("#signin-view").hidden = false;
  $("#project").textContent = "";
  $("#signin-error").textContent = message;
}

async function start() {
  const project = await api("GET", "/v1/project");
  $("#signin-error").textContent = "";
  $("#project").textContent = `project ${project.name}`;
  $("#signin-view").hidden = true;
  $("#app").hidden = false;
  $("#signout").hidden = false;
  state.alertsAfter = 0;
  state.alerts = [];
  $("#alerts").replaceChildren();
  const every = (fn, ms) => { fn(); state.timers.push(setInterval(fn, ms)); };
  every(guard(refreshLists), POLL.lists);
  every(guard(pollAlerts), POLL.alerts);
  every(guard(refreshDeliveries), POLL.deliveries);
  every(guard(pollItem), POLL.item);
}

// Polls report failures on the status line and carry on.
function guard(fn) {
  let running = false;
  return async () => {
    if (running || !sessionStorage.getItem(KEY_STORE)) return;
    running = true;
    try {
      await fn();
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 401)) say(err.message, true);
    } finally {
      running = false;
    }
  };
}

// --- lists of tasks and jobs ------------------------------------------------------------------

async function refreshLists() {
  const [streams, jobs] = await Promise.all([api("GET", "/v1/streams?pageSize=50"),
    api("GET", "/v1/jobs?pageSize=50")]);
  $("#streams").replaceChildren(...streams.items.map((t) => listItem("stream", t.task_id,
    `${t.state}${t.status !== null ? ` (${t.status})` : ""}`,
    `${t.counters.segments} segments · ${t.counters.flagged_segments} flagged · ${t.counters.tokens} tokens`)));
  $("#jobs").replaceChildren(...jobs.items.map((j) => listItem("job", j.id, j.status,
    `${Math.round(j.progress * 100)}% · ${j.segmentsCount} segments`)));
}

function listItem(kind, id, stateText, counters) {
  const current = state.selected && state.selected.id === id;
  return el("li", {}, el("button", { class: "pick", type: "button", "aria-current": String(Boolean(current)),
    "data-id": id, onclick: () => select({ kind, id }) },
  el("div", { class: "id", text: id }), el("div", { text: stateText }), el("div", { class: "muted", text: counters })));
}

// --- the selected task or job ---------------------------------------------------------------

function select(selection) {
  state.generation += 1;
  state.selected = selection;
  state.item = null;
  state.records = [];
  state.recordsAfter = -1;
  state.current = null;
  loadPlayer(null);
  $("#timeline").replaceChildren();
  $("#flagged").replaceChildren();
  $("#boxes").replaceChildren();
  $("#detail").hidden = !selection;
  $("#empty").hidden = Boolean(selection);
  for (const b of document.querySelectorAll(".items button.pick")) {
    b.setAttribute("aria-current", String(Boolean(selection) && b.dataset.id === selection.id));
  }
  if (selection) guard(pollItem)();
}

async function pollItem() {
  const sel = state.selected;
  if (!sel) return;
  const generation = state.generation;
  const base = sel.kind === "stream" ? `/v1/streams/${encodeURIComponent(sel.id)}` : `/v1/jobs/${encodeURIComponent(sel.id)}`;
  const item = await api("GET", base);
  const page = state.recordsAfter === null ? { items: [], next_after: null }
    : await api("GET", `${base}/records?after=${state.recordsAfter}&limit=1000`);
  if (generation !== state.generation) return;
  state.item = item;
  showItem(sel.kind, item);
  const fresh = page.items.filter((r) => r.data.status === 0 || r.data.status === -1);
  state.records.push(...fresh);
  state.recordsAfter = page.next_after; // null: an ended task or job has given every record
  if (fresh.length) renderRecords();
}

function showItem(kind, item) {
  const stream = kind === "stream";
  $("#detail-title").textContent = stream ? item.task_id : item.id;
  const stateText = stream ? item.state + (item.status !== null ? ` · status ${item.status}` : "")
    : `${item.status} · ${Math.round(item.progress * 100)}%`;
  $("#detail-state").textContent = stateText;
  $("#detail-message").textContent = stream ? (item.message || "") : (item.errorMessage || "");
  $("#detail-url").textContent = stream ? item.url : (item.inputUrl || "(upload)");
  const meta = stream ? { metadata: item.metadata, settings: item.settings, counters: item.counters }
    : { metadata: item.metadata, outputFormats: item.outputFormats, moderation: item.moderation,
      categorization: item.categorization, logoDetection: item.logoDetection, tokens: item.tokens };
  const metaText = JSON.stringify(meta, null, 2);
  if ($("#detail-meta").textContent !== metaText) $("#detail-meta").textContent = metaText;
  $("#stop").hidden = !(stream && item.state !== "stopped");
  const playlist = stream ? (item.counters.segments > 0 ? mediaPath(item.playlist_url) : null)
    : (item.status === "COMPLETED" ? mediaPath(item.outputUrl) : null);
  if (playlist && playlist !== state.playlist) loadPlayer(playlist);
}

async function stopSelected() {
  const sel = state.selected;
  if (!sel || sel.kind !== "stream") return;
  say("stopping…");
  await api("POST", `/v1/streams/${encodeURIComponent(sel.id)}/stop`);
  say(`stopped ${sel.id}`);
  await Promise.all([pollItem(), refreshLists()]);
}

// --- records: timeline and flagged frames ------------------------------------------------------

function worstSeverity(record) {
  if (record.data.status !== 0) return "error";
  const moderation = record.data.data.content_moderation;
  if (!moderation) return "none";
  let worst = "none";
  for (const v of moderation.violations) {
    if ((SEVERITY_RANK[v.severity] || 0) > (SEVERITY_RANK[worst] || 0)) worst = v.severity;
  }
  return worst;
}

function renderRecords() {
  const timed = state.records.filter((r) => r.data.data).slice(-TIMELINE_MAX);
  if (!timed.length) return;
  const first = Number(timed[0].data.data.start_time);
  const span = Math.max(0.001, Number(timed[timed.length - 1].data.data.end_time) - first);
  const alerted = new Set(state.alerts.filter((a) => state.selected && a.task_id === state.selected.id)
    .map((a) => a.segment_index));
  $("#timeline").replaceChildren(...timed.map((r) => {
    const d = r.data.data;
    const severity = worstSeverity(r);
    const violations = d.content_moderation ? d.content_moderation.violations : [];
    const label = `segment ${d.segment_index} · ${d.start_time}–${d.end_time} s` +
      (violations.length ? ` · ${violations.map((v) => `${v.category} ${fmt(v.confidence)}`).join(", ")}` : "");
    const b = el("button", { type: "button", class: `sev-${severity}`, title: label, "aria-label": label,
      "data-segment": String(d.segment_index), "data-severity": severity,
      onclick: () => seekTo(d.segment_index, Number(d.start_time)) });
    if (alerted.has(d.segment_index)) b.classList.add("alerting");
    if (state.current === d.segment_index) b.classList.add("current");
    b.style.width = `${((Number(d.end_time) - Number(d.start_time)) / span) * 100}%`;
    return b;
  }));
  renderFlagged();
}

function alertFor(time) {
  return state.alerts.find((a) => state.selected && a.task_id === state.selected.id && Number(a.time) === time);
}

function renderFlagged() {
  const cards = [];
  for (const r of state.records) {
    const d = r.data.data;
    if (!d) continue;
    const frames = d.content_moderation ? d.content_moderation.flagged_frames : [];
    const logos = d.logo_detection && d.logo_detection.logos ? d.logo_detection.logos : [];
    for (const f of frames) cards.push(frameCard(d, Number(f.time), f.violations, logos));
    if (!frames.length && logos.length) cards.push(frameCard(d, Number(logos[0].time), [], logos));
  }
  $("#flagged").replaceChildren(...cards.reverse());
}

function frameCard(d, time, violations, logos) {
  const here = logos.filter((l) => Math.abs(Number(l.time) - time) < 0.001);
  const alert = alertFor(time);
  const picture = alert && mediaPath(alert.frame_url) ? framePicture(mediaPath(alert.frame_url), here) : null;
  const c = d.categorization;
  return el("li", { "data-segment": String(d.segment_index), onclick: () => seekTo(d.segment_index, time) },
    el("strong", { text: `${fmt(time, 3)} s · segment ${d.segment_index}` }),
    picture,
    ...violations.map((v) => el("div", { text: `${v.category} ${fmt(v.confidence)} (${v.severity})` })),
    logos.length ? el("div", { class: "muted", text: `logos: ${logos.map((l) => `${l.name} ${fmt(l.confidence)}`).join(", ")}` }) : null,
    c ? el("div", { class: "tags" }, el("span", { text: `${c.primary_category} ${fmt(c.confidence)}` }),
      ...(c.tags || []).map((t) => el("span", { text: t }))) : null);
}

// A frame's picture with its logos drawn over it (bbox: normalised x, y, width, height).
function framePicture(path, logos) {
  const box = el("div", { class: "frame" }, el("img", { src: path, alt: "flagged frame", loading: "lazy" }));
  for (const l of logos) box.append(logoBox(l, { left: 0, top: 0, width: 100, height: 100, unit: "%" }));
  return box;
}

function logoBox(logo, area) {
  const b = logo.bbox || {};
  const node = el("div", { class: "box" }, el("span", { text: `${logo.name} ${fmt(logo.confidence)}` }));
  node.style.left = `${area.left + Number(b.x) * area.width}${area.unit}`;
  node.style.top = `${area.top + Number(b.y) * area.height}${area.unit}`;
  node.style.width = `${Number(b.width) * area.width}${area.unit}`;
  node.style.height = `${Number(b.height) * area.height}${area.unit}`;
  return node;
}

// --- the player --------------------------------------------------------------------------------

function loadPlayer(path) {
  const video = $("#player");
  if (state.hls) {
    state.hls.destroy();
    state.hls = null;
  }
  state.playlist = path;
  $("#quality").replaceChildren(el("option", { value: "-1", text: "auto" }));
  $("#level").textContent = "";
  delete $("#level").dataset.level;
  if (!path) {
    video.removeAttribute("src");
    video.load();
    return;
  }
  if (window.Hls && window.Hls.isSupported()) {
    const hls = new window.Hls({ enableWorker: true });
    state.hls = hls;
    hls.on(window.Hls.Events.MANIFEST_PARSED, () => {
      $("#quality").replaceChildren(el("option", { value: "-1", text: "auto" }),
        ...hls.levels.map((l, i) => el("option", { value: String(i),
          text: `${l.height ? `${l.height}p` : `level ${i}`} · ${Math.round(l.bitrate / 1000)} kb/s` })));
      video.play().catch(() => {});
    });
    hls.on(window.Hls.Events.LEVEL_SWITCHED, (_, data) => {
      const l = hls.levels[data.level];
      $("#level").textContent = `playing ${l && l.height ? `${l.height}p` : `level ${data.level}`}`;
      $("#level").dataset.level = String(data.level);
    });
    hls.on(window.Hls.Events.ERROR, (_, data) => {
      if (!data.fatal) return;
      say(`player: ${data.details}`, true);
      if (data.type === window.Hls.ErrorTypes.NETWORK_ERROR) setTimeout(() => state.hls === hls && hls.startLoad(), 2000);
      else if (data.type === window.Hls.ErrorTypes.MEDIA_ERROR) hls.recoverMediaError();
    });
    hls.loadSource(path);
    hls.attachMedia(video);
  } else if (video.canPlayType("application/vnd.apple.mpegurl")) {
    video.src = path; // Safari plays HLS natively
    video.play().catch(() => {});
  }
}

function fragments() {
  const hls = state.hls;
  if (!hls || !hls.levels.length) return [];
  const level = hls.levels[Math.max(0, hls.currentLevel >= 0 ? hls.currentLevel : hls.loadLevel)] || hls.levels[0];
  return level && level.details ? level.details.fragments : [];
}

const segmentFile = (index) => `segment_${String(index).padStart(3, "0")}.ts`;

// Where segment `index`, at timeline `time`, sits on the player's clock: the
// player's own fragment start when it knows the segment, else timeline time.
function playerTime(index, time) {
  const frag = fragments().find((f) => f.relurl && f.relurl.endsWith(segmentFile(index)));
  const record = state.records.find((r) => r.data.data && r.data.data.segment_index === index);
  if (frag && record) return frag.start + Math.max(0, time - Number(record.data.data.start_time));
  return time;
}

function seekTo(index, time) {
  const video = $("#player");
  video.currentTime = playerTime(index, time) + 0.05;
  video.play().catch(() => {});
  state.current = index;
  for (const b of document.querySelectorAll("#timeline button")) {
    b.classList.toggle("current", b.dataset.segment === String(index));
  }
}

function onTime() {
  const video = $("#player");
  const t = video.currentTime;
  const frag = fragments().find((f) => f.start <= t && t < f.start + f.duration);
  const index = frag && frag.relurl ? Number((frag.relurl.match(/segment_(\d+)\.ts$/) || [])[1]) : NaN;
  $("#clock").textContent = `${fmt(t, 1)} s${Number.isNaN(index) ? "" : ` · segment ${index}`}`;
  $("#clock").dataset.segment = Number.isNaN(index) ? "" : String(index);
  drawPlayerLogos(index, t, frag);
}

// Logos of the segment on screen, drawn over the picture while their frame shows.
function drawPlayerLogos(index, t, frag) {
  const video = $("#player");
  const boxes = $("#boxes");
  const record = state.records.find((r) => r.data.data && r.data.data.segment_index === index);
  const logos = record && record.data.data.logo_detection ? record.data.data.logo_detection.logos || [] : [];
  const start = record ? Number(record.data.data.start_time) : 0;
  const showing = frag ? logos.filter((l) => Math.abs(frag.start + Number(l.time) - start - t) < 0.5) : [];
  if (!showing.length || !video.videoWidth) {
    if (boxes.childElementCount) boxes.replaceChildren();
    return;
  }
  const cw = video.clientWidth;
  const ch = video.clientHeight;
  const scale = Math.min(cw / video.videoWidth, ch / video.videoHeight);
  const w = video.videoWidth * scale;
  const h = video.videoHeight * scale;
  const area = { left: (cw - w) / 2, top: (ch - h) / 2, width: w, height: h, unit: "px" };
  boxes.replaceChildren(...showing.map((l) => logoBox(l, area)));
}

// --- alerts --------------------------------------------------------------------------------------

// The first poll after sign-in catches up quietly (the newest ALERTS_SHOWN are
// listed); later ones announce each new alert.
async function pollAlerts() {
  const catchingUp = state.alertsAfter === 0 && !state.alerts.length;
  const limit = catchingUp ? 1000 : 100;
  let forSelected = false;
  for (let pages = 0; pages < 200; pages += 1) {
    const page = await api("GET", `/v1/alerts?after=${state.alertsAfter}&limit=${limit}`);
    state.alertsAfter = page.next_after;
    for (const a of page.items) {
      state.alerts.unshift(a);
      forSelected = forSelected || Boolean(state.selected && a.task_id === state.selected.id);
      if (!catchingUp) {
        $("#alerts").prepend(alertCard(a, true));
        say(`alert: ${a.category} on ${a.task_id} at ${a.time} s`);
      }
    }
    state.alerts.length = Math.min(state.alerts.length, 1000);
    if (page.items.length < limit) break;
  }
  if (catchingUp) $("#alerts").replaceChildren(...state.alerts.slice(0, ALERTS_SHOWN).map((a) => alertCard(a, false)));
  while ($("#alerts").childElementCount > ALERTS_SHOWN) $("#alerts").lastElementChild.remove();
  if (forSelected) renderRecords(); // its segments get their alert marks, its frames their pictures
}

function alertCard(a, fresh) {
  const path = mediaPath(a.frame_url);
  return el("li", { class: fresh ? "new" : "", "data-task": a.task_id, "data-category": a.category,
    onclick: () => { if (!state.selected || state.selected.id !== a.task_id) select({ kind: "stream", id: a.task_id }); } },
  el("strong", { text: `${a.category} ${fmt(a.confidence)} (${a.severity})` }),
  path ? el("div", { class: "frame" }, el("img", { src: path, alt: `alert frame at ${a.time} s` })) : null,
  el("div", { class: "muted", text: `${a.task_id} · ${a.time} s · segment ${a.segment_index}` }),
  el("div", { class: "muted", text: a.created_at }));
}

// --- deliveries ------------------------------------------------------------------------------------

async function refreshDeliveries() {
  const page = await api("GET", "/v1/deliveries?pageSize=15");
  $("#deliveries").replaceChildren(...page.items.map((d) => el("li", { "data-delivery": d.id },
    el("div", { text: `${d.event} · ${d.status} · ${d.attempts} attempt${d.attempts === 1 ? "" : "s"}` }),
    el("div", { class: "muted id", text: d.url }),
    d.lastError ? el("div", { class: "error", text: d.lastError }) : null,
    d.status !== "delivered" ? el("button", { type: "button", class: "small", text: "retry",
      onclick: guard(async () => { await api("POST", `/v1/deliveries/${encodeURIComponent(d.id)}/retry`);
        say(`retrying ${d.id}`); await refreshDeliveries(); }) }) : null)));
}

// --- forms ------------------------------------------------------------------------------------------

function jsonField(form, name) {
  const text = form.elements[name].value.trim();
  if (!text) return undefined;
  try {
    return JSON.parse(text);
  } catch {
    throw new Error(`${name} is not valid JSON`);
  }
}

const listField = (form, name) => form.elements[name].value.split(",").map((s) => s.trim()).filter(Boolean);

// Form submissions: the body's fields, the form's metadata JSON, then the new item selected.
async function submit(event, kind, path, fields) {
  event.preventDefault();
  const body = fields(event.target);
  const metadata = jsonField(event.target, "metadata");
  if (metadata !== undefined) body.metadata = metadata;
  const created = await api("POST", path, body);
  const id = kind === "stream" ? created.task_id : created.id;
  say(`${kind === "stream" ? "started" : "submitted"} ${id}`);
  await refreshLists();
  select({ kind, id });
}

function streamFields(f) {
  const body = { url: f.elements.url.value.trim(),
    enable_content_moderation: f.elements.enable_content_moderation.checked,
    enable_categorization: f.elements.enable_categorization.checked,
    segment_seconds: Number(f.elements.segment_seconds.value), fps: Number(f.elements.fps.value),
    threshold: Number(f.elements.threshold.value), renditions: listField(f, "renditions") };
  if (f.elements.alert_threshold.value !== "") {
    body.alert_threshold = Number(f.elements.alert_threshold.value);
    body.alert_cooldown_seconds = Number(f.elements.alert_cooldown_seconds.value);
  }
  if (f.elements.callback_url.value.trim()) body.callback_url = f.elements.callback_url.value.trim();
  return body;
}

const jobFields = (f) => ({ inputUrl: f.elements.inputUrl.value.trim(), outputFormats: listField(f, "outputFormats"),
  ffmpegPreset: f.elements.ffmpegPreset.value, moderate: f.elements.moderate.checked,
  categorize: f.elements.categorize.checked });

// Form handlers report failures on the status line.
const reporting = (fn) => async (event) => {
  try {
    await fn(event);
  } catch (err) {
    event.preventDefault();
    say(err.message, true);
  }
};

// --- wiring ------------------------------------------------------------------------------------------

$("#signin").addEventListener("submit", signIn);
$("#signout").addEventListener("click", () => signOut());
$("#stop").addEventListener("click", guard(stopSelected));
$("#start-form").addEventListener("submit", reporting((e) => submit(e, "stream", "/v1/streams", streamFields)));
$("#job-form").addEventListener("submit", reporting((e) => submit(e, "job", "/v1/jobs", jobFields)));
$("#deliveries-refresh").addEventListener("click", guard(refreshDeliveries));
$("#quality").addEventListener("change", (e) => {
  if (state.hls) state.hls.currentLevel = Number(e.target.value);
});
$("#player").addEventListener("timeupdate", onTime);
if (sessionStorage.getItem(KEY_STORE)) start().catch((err) => signOut(err.message));

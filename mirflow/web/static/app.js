// The demo page: every number comes from the API; nothing is computed here but the drawing.
"use strict";

const $ = (id) => document.getElementById(id);
const PALETTE = ["#e63946", "#457b9d", "#2a9d8f", "#f4a261", "#6a4c93", "#8ab17d", "#e76f51", "#264653"];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function trackItem(t, extra) {
  const li = el("li", {"data-track": t.track_id}, el("strong", {}, t.track_id), " ",
                el("span", {class: "tags"}, t.tags.join(", ")), extra ? ` ${extra}` : "");
  li.append(el("audio", {controls: "", preload: "none", src: t.audio}));
  return li;
}

async function api(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function analyze(file) {
  $("status").className = "muted";
  $("status").textContent = `analyzing ${file.name} …`;
  $("result").hidden = true;
  const form = new FormData();
  form.append("file", file);
  try {
    const body = await api("/api/analyze", {method: "POST", body: form});
    $("status").textContent = `${file.name}: ${body.duration_s.toFixed(1)} s`;
    $("tags").replaceChildren(...body.tags.slice(0, 10).map((t) => el("li", {},
      el("span", {class: "bar", style: `width:${Math.round(t.score * 120)}px`}), `${t.tag} ${t.score.toFixed(2)}`)));
    $("similar").replaceChildren(...body.similar.map((t) => trackItem(t, `cos ${t.cosine.toFixed(2)}`)));
    $("listeners").replaceChildren(...body.listeners.map((u) => el("li", {}, `${u.user_id} (${u.score.toFixed(2)})`)));
    $("result").hidden = false;
  } catch (err) {
    $("status").className = "error";
    $("status").textContent = `${file.name}: ${err.message}`;
  }
}

function setupUpload() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => e.target.files.length && analyze(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) analyze(e.dataTransfer.files[0]);
  });
}

let points = [];

function drawMap() {
  const svg = $("map");
  const tag = $("colour-tag").value;
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => 15 + (x - x0) / (x1 - x0 || 1) * 570, sy = (y) => 405 - (y - y0) / (y1 - y0 || 1) * 390;
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  for (const p of points) {
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("cx", sx(p.x).toFixed(1));
    c.setAttribute("cy", sy(p.y).toFixed(1));
    c.setAttribute("r", "4.5");
    c.setAttribute("fill", p.tags.includes(tag) ? PALETTE[0] : "#b8c2cc");
    c.setAttribute("fill-opacity", p.tags.includes(tag) ? "0.9" : "0.55");
    c.dataset.track = p.track_id;
    const title = document.createElementNS(ns, "title");
    title.textContent = `${p.track_id}: ${p.tags.join(", ")}`;
    c.append(title);
    c.addEventListener("click", () => showTrack(p.track_id));
    svg.append(c);
  }
}

async function showTrack(id) {
  document.querySelectorAll("#map circle.selected").forEach((c) => c.classList.remove("selected"));
  document.querySelector(`#map circle[data-track="${CSS.escape(id)}"]`)?.classList.add("selected");
  const body = await api(`/api/tracks/${encodeURIComponent(id)}`);
  $("track-title").textContent = `${body.track_id}: ${body.tags.join(", ")}`;
  $("player").src = body.audio;
  $("player").play().catch(() => {});
  const rows = Math.max(body.by_wmf.length, body.by_predicted.length);
  const cell = (t) => t ? el("td", {}, el("strong", {}, t.track_id), " ", el("span", {class: "tags"}, t.tags.join(", "))) : el("td", {}, "–");
  $("neighbours").tBodies[0].replaceChildren(...Array.from({length: rows}, (_, i) =>
    el("tr", {}, el("td", {}, i + 1), cell(body.by_wmf[i]), cell(body.by_predicted[i]))));
  $("track").hidden = false;
}

async function setupMap() {
  points = (await api("/api/map")).points;
  const counts = {};
  points.forEach((p) => p.tags.forEach((t) => { counts[t] = (counts[t] || 0) + 1; }));
  const tags = Object.keys(counts).sort((a, b) => counts[b] - counts[a]);
  $("colour-tag").replaceChildren(...tags.map((t) => el("option", {value: t}, `${t} (${counts[t]})`)));
  $("colour-tag").addEventListener("change", drawMap);
  drawMap();
}

async function setupHealth() {
  const h = await api("/healthz");
  $("health").textContent = `${h.tracks} tracks, ${h.users} listeners; models: ${h.models}`;
}

setupUpload();
setupMap().catch((err) => { $("map").replaceWith(el("p", {class: "error"}, `map: ${err.message}`)); });
setupHealth().catch(() => {});

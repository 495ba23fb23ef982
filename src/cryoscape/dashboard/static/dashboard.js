// cryoscape dashboard: the page's logic. Everything is computed by the Python session behind /api;
// this file draws (plotly.js, shipped inside the plotly Python package) and forwards the user's gestures.
"use strict";

const state = {
  summary: null, embedding: "pc", x: null, y: null, colour: null, polygon: null, selectionCount: 0,
  anchors: [], path: null, playing: false, volume: null, mapShown: null, timings: [],
  mapRequests: 0, mapsShown: 0,
};
window.cryoscape = state;  // for the browser tests and the curious

const $ = (id) => document.getElementById(id);
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94"];

function setStatus(text, error = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", error);
}

async function api(path, body) {
  const options = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                              body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({error: `${response.status} ${response.statusText}`}));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function unpack(packed) {
  const bytes = Uint8Array.from(atob(packed.b64), (c) => c.charCodeAt(0));
  return packed.dtype === "int32" ? new Int32Array(bytes.buffer) : new Float32Array(bytes.buffer);
}

// ------------------------------------------------------------------ latent scatter
function markerFor(colour) {
  const n = state.x.length;
  if (!colour || colour.name === "none") return {color: "#4a6fa5", size: n > 20000 ? 2 : 4, opacity: 0.6};
  if (colour.categorical) {
    const colours = Array.from(colour.values, (v) => PALETTE[((v % PALETTE.length) + PALETTE.length) % PALETTE.length]);
    return {color: colours, size: n > 20000 ? 2 : 4, opacity: 0.75};
  }
  return {color: Array.from(colour.values), colorscale: "Viridis", showscale: true, size: n > 20000 ? 2 : 4,
          colorbar: {title: {text: colour.name}, thickness: 12}};
}

function scatterTraces() {
  const idx = Array.from(state.x, (_, i) => i);
  const traces = [{type: "scattergl", mode: "markers", x: Array.from(state.x), y: Array.from(state.y),
                   customdata: idx, marker: markerFor(state.colour), name: "particles",
                   hovertemplate: "particle %{customdata}<extra></extra>"}];
  if (state.colour && state.colour.centres) {
    traces.push({type: "scatter", mode: "markers+text", x: state.colour.centres.map((i) => state.x[i]),
                 y: state.colour.centres.map((i) => state.y[i]), customdata: state.colour.centres,
                 text: state.colour.centres.map((_, c) => String(c)), textposition: "top right",
                 marker: {symbol: "x", color: "black", size: 9}, name: "on-data centres",
                 hovertemplate: "centre of cluster %{text}: particle %{customdata}<extra></extra>"});
  }
  if (state.anchors.length) {
    traces.push({type: "scatter", mode: "markers", x: state.anchors.map((i) => state.x[i]),
                 y: state.anchors.map((i) => state.y[i]), customdata: state.anchors, name: "anchors",
                 marker: {symbol: "star", size: 14, color: "black"}, hoverinfo: "skip"});
  }
  if (state.path) {
    const p = state.path.indices;
    traces.push({type: "scatter", mode: "lines", x: p.map((i) => state.x[i]), y: p.map((i) => state.y[i]),
                 line: {color: "#d62728", width: 2}, name: "graph path", hoverinfo: "skip"});
  }
  return traces;
}

async function drawScatter() {
  const label = state.embedding === "pc" ? "PC" : state.embedding === "umap" ? "UMAP" : "z";
  const layout = {dragmode: "lasso", margin: {l: 50, r: 10, t: 10, b: 40}, showlegend: false, hovermode: "closest",
                  xaxis: {title: {text: `${label}1`}}, yaxis: {title: {text: `${label}2`}}, uirevision: state.embedding};
  await Plotly.react("scatter", scatterTraces(), layout, {displaylogo: false, responsive: true});
}

async function loadEmbedding(name) {
  setStatus(`loading the ${name} embedding...`);
  const data = await api(`api/points?embedding=${encodeURIComponent(name)}`);
  state.embedding = name;
  state.x = unpack(data.x);
  state.y = unpack(data.y);
  state.polygon = null;
  showSelection(null);
  await drawScatter();
  setStatus("");
}

async function loadColour() {
  const kind = $("colour-kind").value;
  $("colour-k").hidden = !(kind === "kmeans" || kind === "gmm");
  $("colour-choice").hidden = !(kind === "labels" || kind === "value");
  if (kind === "labels" || kind === "value") {
    const options = kind === "labels" ? state.summary.label_files : state.summary.values;
    const sel = $("colour-choice");
    if (sel.dataset.kind !== kind) {
      sel.innerHTML = "";
      for (const o of options) sel.add(new Option(o, o));
      sel.dataset.kind = kind;
    }
    if (!options.length) { setStatus("no label files in the run folder (run cryoscape analyze first)"); return; }
  }
  const spec = kind === "none" ? "none" : (kind === "kmeans" || kind === "gmm") ? `${kind}:${$("colour-k").value}`
    : `${kind}:${$("colour-choice").value}`;
  setStatus(`colouring by ${spec}...`);
  const data = await api(`api/colour?spec=${encodeURIComponent(spec)}`);
  state.colour = {name: data.name, categorical: data.categorical, values: unpack(data.values), centres: data.centres};
  await drawScatter();
  setStatus("");
}

// ------------------------------------------------------------------ selection and export
function polygonOf(event) {
  if (!event) return null;
  if (event.lassoPoints && event.lassoPoints.x) return event.lassoPoints.x.map((x, i) => [x, event.lassoPoints.y[i]]);
  if (event.range && event.range.x) {
    const [x0, x1] = event.range.x, [y0, y1] = event.range.y;
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]];
  }
  return null;
}

function showSelection(count) {
  state.selectionCount = count || 0;
  $("selection-count").textContent = count === null ? "no selection"
    : `${count} of ${state.summary.n_particles} particles selected`;
  $("export").disabled = !count;
}

async function onSelected(event) {
  const polygon = polygonOf(event);
  if (!polygon || polygon.length < 3) return;
  state.polygon = polygon;
  const data = await api("api/select", {polygon, embedding: state.embedding});
  state.selected = unpack(data.positions);
  showSelection(data.count);
}

async function exportSelection() {
  const body = {polygon: state.polygon, embedding: state.embedding, name: $("export-name").value,
                format: $("export-format").value};
  const data = await api("api/export", body);
  const links = Object.entries(data.files).map(([kind, f]) => `<a href="files/${encodeURI(f)}">${kind}: ${f}</a>`);
  $("export-result").innerHTML = `${data.count} particles: ${links.join(", ")}`;
  state.lastExport = data;
}

// ------------------------------------------------------------------ map viewer
async function drawSlices(reply) {  // PNGs made by the server: images draw faster than three heatmaps
  await Promise.all(["slice-xy", "slice-xz", "slice-yz"].map((id, axis) => {
    const img = $(id);
    img.src = reply.slices[axis];
    return img.decode().catch(() => undefined);
  }));
}

function meshTrace(reply) {
  const v = unpack(reply.vertices), f = unpack(reply.faces);
  const pick = (arr, k, stride) => { const out = new Float32Array(arr.length / stride); for (let i = 0; i < out.length; i++) out[i] = arr[i * stride + k]; return out; };
  return {type: "mesh3d", x: pick(v, 0, 3), y: pick(v, 1, 3), z: pick(v, 2, 3), i: pick(f, 0, 3), j: pick(f, 1, 3),
          k: pick(f, 2, 3), color: "#b3b3ff", flatshading: false, hoverinfo: "skip",
          lighting: {ambient: 0.35, diffuse: 0.8, specular: 0.25, roughness: 0.6}, lightposition: {x: 1e5, y: 1e5, z: 5e4}};
}

function sceneLayout(n) {
  const axis = (t) => ({title: {text: t}, range: [0, n - 1]});
  return {margin: {l: 0, r: 0, t: 0, b: 0}, uirevision: "map",
          scene: {aspectmode: "cube", xaxis: axis("x"), yaxis: axis("y"), zaxis: axis("z")}};
}

async function drawMap(reply, label) {
  state.volume = {box: reply.box, level: reply.level, min: reply.min, max: reply.max, index: reply.index, latent: reply.latent};
  await Plotly.react("iso", [meshTrace(reply)], sceneLayout(reply.box), {displaylogo: false, responsive: true});
  const slider = $("level");
  slider.min = reply.min; slider.max = reply.max; slider.step = (reply.max - reply.min) / 400 || 1e-6;
  slider.value = reply.level; slider.disabled = false;
  $("level-value").textContent = Number(reply.level).toPrecision(3);
  await drawSlices(reply);
  $("map-info").textContent = `${label}: ${reply.box}^3 map, ` +
    (reply.cached ? "cached" : `decoded in ${reply.decode_seconds.toFixed(2)} s`) + `, ${unpack(reply.faces).length / 3} triangles`;
}

let levelTimer = null;
function onLevel(value) {
  $("level-value").textContent = Number(value).toPrecision(3);
  clearTimeout(levelTimer);
  levelTimer = setTimeout(async () => {
    const v = state.volume;
    const reply = await api("api/map", {latent: v.latent, level: Number(value)});
    await Plotly.react("iso", [meshTrace(reply)], sceneLayout(reply.box), {displaylogo: false, responsive: true});
    state.levelShown = Number(value);
  }, 60);
}

async function showMap(index, label, where) {
  if (!state.summary.maps) { setStatus(`no maps: ${state.summary.maps_unavailable}`, true); return; }
  const t0 = performance.now();
  state.mapRequests += 1;
  setStatus(`decoding the map of ${label || `particle ${index}`}...`);
  const reply = await api("api/map", where || {index});
  const t1 = performance.now();
  await drawMap(reply, label || `particle ${index}`);
  const ms = performance.now() - t0;
  state.timings.push({index, ms, reply_ms: t1 - t0, draw_ms: ms - (t1 - t0), decode_seconds: reply.decode_seconds,
                      cached: reply.cached});
  state.mapShown = index;
  state.mapsShown += 1;
  setStatus(`map of particle ${index} shown ${(ms / 1000).toFixed(2)} s after the click`);
}

async function onFreeClick(event) {
  if (!$("free-point").checked || state.embedding !== "pc") return;
  const gd = $("scatter"), L = gd._fullLayout, box = gd.getBoundingClientRect();
  const px = event.clientX - box.left - L._size.l, py = event.clientY - box.top - L._size.t;
  if (px < 0 || py < 0 || px > L._size.w || py > L._size.h) return;
  const pc = [L.xaxis.p2d(px), L.yaxis.p2d(py)];
  state.freePoint = pc;
  await showMap(null, `PC1 ${pc[0].toPrecision(3)}, PC2 ${pc[1].toPrecision(3)}`, {pc});
}

async function onClick(event) {
  if ($("free-point").checked && state.embedding === "pc") return;  // the click decodes the point itself
  if (!event || !event.points || !event.points.length) return;
  const point = event.points[0];
  const index = Number(point.customdata);
  if (!Number.isInteger(index)) return;
  if ($("anchor-mode").checked) {
    state.anchors.push(index);
    $("anchors").textContent = `anchors: ${state.anchors.join(", ")}`;
    await drawScatter();
    return;
  }
  await showMap(index);
}

// ------------------------------------------------------------------ trajectories
function pathOptions() {
  return {anchors: state.anchors, avg_neighbors: Number($("avg-neighbors").value), max_maps: Number($("max-maps").value)};
}

async function findPath() {
  setStatus("finding the graph path...");
  state.path = await api("api/path", pathOptions());
  $("path-result").textContent = `${state.path.indices.length} particles on the path, ${state.path.map_indices.length} maps`;
  $("path-play").disabled = $("path-save").disabled = false;
  await drawScatter();
  setStatus("");
}

async function playPath() {
  if (state.playing) { state.playing = false; return; }
  state.playing = true;
  $("path-play").textContent = "stop";
  const frames = state.path.map_indices;
  try {
    for (let loop = 0; state.playing && loop < 50; loop++) {
      for (let f = 0; f < frames.length && state.playing; f++) {
        await showMap(frames[f], `frame ${f + 1}/${frames.length} (particle ${frames[f]})`);
        await new Promise((r) => setTimeout(r, 120));
      }
    }
  } finally {
    state.playing = false;
    $("path-play").textContent = "play";
  }
}

async function savePath() {
  setStatus("saving the trajectory's maps...");
  const data = await api("api/path/save", {...pathOptions(), name: $("path-name").value});
  $("path-result").innerHTML = `saved ${data.maps.length} maps in <a href="files/${encodeURI(data.report)}">${data.folder}/</a>`;
  state.savedPath = data;
  setStatus("");
}

// ------------------------------------------------------------------ k-means centre maps
async function showCentres() {
  const k = $("centres-k").value;
  setStatus(`decoding ${k} centre maps...`);
  const data = await api(`api/centres?k=${encodeURIComponent(k)}`);
  const gallery = $("centres");
  gallery.innerHTML = "";
  data.pictures.forEach((p, c) => {
    const fig = document.createElement("figure");
    fig.innerHTML = `<div class="pair"><img src="${p.surface}" alt="cluster ${c} isosurface"><img src="${p.slice}" alt="cluster ${c} slice"></div>` +
      `<figcaption>cluster ${c}: particle ${data.indices[c]}</figcaption>`;
    fig.addEventListener("click", () => showMap(data.indices[c], `centre of cluster ${c} (particle ${data.indices[c]})`).catch(fail));
    gallery.appendChild(fig);
  });
  setStatus("");
}

// ------------------------------------------------------------------ training progress
async function refreshHistory() {
  const h = await api("api/history");
  if (!h.epochs.length) { $("loss-info").textContent = "no training history in the run folder"; return; }
  const traces = [{x: h.epochs, y: h.loss, name: "loss", mode: "lines+markers"}];
  if (h.error.some((v) => v !== null)) traces.push({x: h.epochs, y: h.error, name: "squared error", mode: "lines"});
  if (h.kl.some((v) => v !== null)) traces.push({x: h.epochs, y: h.kl, name: "KL", yaxis: "y2", mode: "lines"});
  await Plotly.react("loss", traces, {margin: {l: 50, r: 50, t: 10, b: 40}, xaxis: {title: {text: "epoch (0-based)"}},
    yaxis: {title: {text: "loss"}}, yaxis2: {title: {text: "KL"}, overlaying: "y", side: "right"}},
    {displaylogo: false, responsive: true});
  $("loss-info").textContent = `${h.epochs.length}${h.planned_epochs ? ` of ${h.planned_epochs}` : ""} epochs` +
    (h.in_progress ? " (training in progress: refreshed every 5 s)" : "");
  if (h.in_progress) setTimeout(() => refreshHistory().catch(fail), 5000);
}

// ------------------------------------------------------------------ start
function fail(err) { console.warn(err); setStatus(String(err.message || err), true); }

async function start() {
  state.summary = await api("api/summary");
  const s = state.summary;
  $("run-name").textContent = s.run;
  $("run-info").textContent = `${s.n_particles} particles, zdim ${s.zdim}, epoch ${s.epoch}` +
    (s.maps ? `, maps by ${s.decoder} at ${s.view_box}^3 (training box ${s.box_size})` : ", no maps");
  for (const e of s.embeddings) $("embedding").add(new Option(e, e));
  $("embedding").addEventListener("change", (e) => loadEmbedding(e.target.value).catch(fail));
  for (const id of ["colour-kind", "colour-k", "colour-choice"]) $(id).addEventListener("change", () => loadColour().catch(fail));
  $("colour-k").hidden = true;
  $("export").addEventListener("click", () => exportSelection().catch(fail));
  $("level").addEventListener("input", (e) => onLevel(e.target.value));
  $("path-find").addEventListener("click", () => findPath().catch(fail));
  $("path-play").addEventListener("click", () => playPath().catch(fail));
  $("path-save").addEventListener("click", () => savePath().catch(fail));
  $("path-clear").addEventListener("click", () => {
    state.anchors = []; state.path = null; $("anchors").textContent = "anchors: none";
    $("path-play").disabled = $("path-save").disabled = true; drawScatter().catch(fail);
  });
  $("centres-show").addEventListener("click", () => showCentres().catch(fail));
  // the 3-D scene is created now, so the first click pays for a map, not for the viewer's set-up
  await Plotly.newPlot("iso", [{type: "mesh3d", x: [], y: [], z: [], i: [], j: [], k: []}], sceneLayout(s.view_box || 2),
                       {displaylogo: false, responsive: true});
  await loadEmbedding("pc");
  const gd = $("scatter");
  gd.on("plotly_selected", (e) => onSelected(e).catch(fail));
  gd.on("plotly_click", (e) => onClick(e).catch(fail));
  gd.addEventListener("click", (e) => onFreeClick(e).catch(fail));
  state.ready = true;
  refreshHistory().catch(fail);
}

// page coordinates of a data point of the scatter (for scripted gestures in the browser tests)
state.dataToPage = (x, y) => {
  const gd = $("scatter"), L = gd._fullLayout, box = gd.getBoundingClientRect();
  return {x: box.left + window.scrollX + L._size.l + L.xaxis.d2p(x), y: box.top + window.scrollY + L._size.t + L.yaxis.d2p(y)};
};

start().catch(fail);

// The moe-vision page: send an image to POST /predict, draw each task's answer on it and the
// experts each patch was routed to. No framework, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
let INFO = null;        // GET /info
let LAST = null;        // { result, image } of the last prediction, redrawn when a slider moves

// A fixed colour per expert id (and per class id): golden-angle hues, so neighbours differ.
function colour(i, alpha = 1) {
  const hue = (i * 137.508) % 360;
  return `hsla(${hue.toFixed(1)}, 70%, ${i % 2 ? 45 : 58}%, ${alpha})`;
}
function rgb(i) {
  const c = document.createElement("canvas").getContext("2d");
  c.fillStyle = colour(i); c.fillRect(0, 0, 1, 1);
  return c.getImageData(0, 0, 1, 1).data;
}
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "style") e.style.cssText = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}
function showError(msg) {
  const box = $("#error");
  box.textContent = msg; box.hidden = !msg;
}
function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot show this image"));
    img.src = src;
  });
}

async function init() {
  const res = await fetch("/info");
  INFO = await res.json();
  const kind = INFO.kind === "bundle" ? "bundle" : "run";
  $("#model-name").textContent = `${kind} ${INFO.name} · tasks: ${Object.keys(INFO.tasks).join(", ")}`;
  const select = $("#task-select");
  for (const [task, t] of Object.entries(INFO.tasks)) select.append(el("option", { value: task }, `${task} (${t.type})`));
  for (const ex of INFO.examples) {
    const img = el("img", { src: `/examples/${ex.id}`, title: `${ex.task}: ${ex.name}`, "data-example": ex.id });
    img.addEventListener("click", () => runExample(ex.id));
    $("#examples").append(img);
  }
}

async function predict(form, imageSrc) {
  showError("");
  const status = $("#run-status");
  status.hidden = false;
  try {
    const task = $("#task-select").value;
    if (task) form.append("task", task);
    const res = await fetch("/predict", { method: "POST", body: form });
    const body = await res.json();
    if (!res.ok) throw new Error(body.error || `the server answered ${res.status}`);
    const image = await loadImage(imageSrc);
    LAST = { result: body, image };
    render();
  } catch (e) {
    showError(e.message);
  } finally {
    status.hidden = true;
  }
}

function runFile(file) {
  const form = new FormData();
  form.append("file", file);
  predict(form, URL.createObjectURL(file));
}
function runExample(id) {
  const form = new FormData();
  form.append("example", id);
  predict(form, `/examples/${id}`);
}

function render() {
  const results = $("#results");
  results.replaceChildren();
  const { result, image } = LAST;
  for (const [task, out] of Object.entries(result.tasks)) {
    const card = el("div", { class: "task-card", "data-task": task, "data-type": out.type });
    card.append(el("h2", {}, `${task} · ${out.type}`));
    const canvas = el("canvas", { class: "answer" });
    // drawn at least 480 px wide (small images scaled up), so labels stay readable
    canvas.scale = Math.max(1, 480 / image.naturalWidth);
    canvas.width = Math.round(image.naturalWidth * canvas.scale);
    canvas.height = Math.round(image.naturalHeight * canvas.scale);
    card.append(canvas);
    results.append(card);
    const draw = { cls: drawCls, det: drawDet, seg: drawSeg, depth: drawDepth }[out.type];
    draw(card, canvas, image, out, task);
    drawRouting(card, image, out, task);
  }
}

function drawImage(canvas, image) {
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = canvas.scale < 2;
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingEnabled = true;
  return ctx;
}

function drawCls(card, canvas, image, out, task) {
  drawImage(canvas, image);
  const list = el("ol", { class: "top5" });
  for (const p of out.top5) {
    list.append(el("li", { class: "top5-item" }, el("span", {}, p.name),
      el("span", { class: "meter", style: `width:${(100 * p.score).toFixed(1)}%` }), el("span", {}, p.score.toFixed(3))));
  }
  card.append(list);
  canvas.dataset.drawn = out.top5.length;
}

function drawDet(card, canvas, image, out, task) {
  const ctx = drawImage(canvas, image);
  const minScore = parseFloat($("#score-slider").value);
  const names = INFO.tasks[task].classes;
  const kept = out.detections.filter((d) => d.score >= minScore);
  ctx.lineWidth = Math.max(2, canvas.width / 250);
  ctx.font = `${Math.max(13, canvas.width / 40)}px system-ui`;
  for (const d of kept) {
    const [x, y, w, h] = d.bbox.map((v) => v * canvas.scale);
    ctx.strokeStyle = colour(d.category_id); ctx.fillStyle = colour(d.category_id);
    ctx.strokeRect(x, y, w, h);
    ctx.fillText(`${names[d.category_id] ?? d.category_id} ${d.score.toFixed(2)}`, x + 2, Math.max(12, y - 3));
  }
  canvas.dataset.drawn = kept.length;
  card.append(el("div", { class: "muted" }, `${kept.length} of ${out.detections.length} detections with score ≥ ${minScore.toFixed(2)}`));
}

async function drawSeg(card, canvas, image, out, task) {
  const ctx = canvas.getContext("2d");
  const labels = await loadImage(`data:image/png;base64,${out.label_map_png}`);
  const off = el("canvas"); off.width = labels.naturalWidth; off.height = labels.naturalHeight;
  const octx = off.getContext("2d");
  octx.drawImage(labels, 0, 0);
  const data = octx.getImageData(0, 0, off.width, off.height);
  const cache = {};
  for (let i = 0; i < data.data.length; i += 4) {
    const label = data.data[i];
    const c = cache[label] || (cache[label] = rgb(label));
    data.data[i] = c[0]; data.data[i + 1] = c[1]; data.data[i + 2] = c[2]; data.data[i + 3] = 255;
  }
  octx.putImageData(data, 0, 0);
  drawImage(canvas, image);
  ctx.imageSmoothingEnabled = false;
  ctx.globalAlpha = parseFloat($("#opacity-slider").value);
  ctx.drawImage(off, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 1;
  const names = INFO.tasks[task].classes;
  const legend = el("div", { class: "legend" });
  for (const c of out.classes_present) legend.append(el("span", { class: "legend-item", style: `--swatch:${colour(c)}` }, names[c] ?? c));
  card.append(legend);
  canvas.dataset.drawn = out.classes_present.length;
}

async function drawDepth(card, canvas, image, out) {
  const ctx = canvas.getContext("2d");
  const preview = await loadImage(`data:image/png;base64,${out.preview_png}`);
  ctx.drawImage(preview, 0, 0, canvas.width, canvas.height);
  // magma, near (bright) to far (dark), as the preview
  const stops = ["#fcfdbf", "#fc8961", "#b73779", "#51127c", "#000004"];
  card.append(el("div", { class: "colour-bar", style: `background:linear-gradient(90deg,${stops.join(",")})` }));
  card.append(el("div", { class: "colour-bar-labels" }, el("span", {}, `${out.depth_m.min.toFixed(2)} m`),
    el("span", {}, "depth"), el("span", {}, `${out.depth_m.max.toFixed(2)} m`)));
  canvas.dataset.drawn = 1;
}

function drawRouting(card, image, out, task) {
  const box = el("div", { class: "routing" });
  box.append(el("h3", {}, "Experts per patch (top-1 of each MoE layer; hover for the top-k weights)"));
  const layers = el("div", { class: "layers" });
  for (const m of out.routing) {
    const [gh, gw] = m.grid;
    const [ih, iw] = out.input_size;
    const wrap = el("div", { class: "layer" });
    wrap.append(el("div", {}, m.layer));
    const map = el("canvas", { class: "routing-map", "data-layer": m.layer });
    map.width = gw * 16; map.height = gh * 16;
    const ctx = map.getContext("2d");
    // the image as the model saw it (resized, patch grid on top), then each patch's expert
    ctx.drawImage(image, 0, 0, map.width * iw / (gw * INFO.patch_size), map.height * ih / (gh * INFO.patch_size));
    ctx.globalAlpha = parseFloat($("#opacity-slider").value);
    for (let r = 0; r < gh; r++) for (let c = 0; c < gw; c++) {
      ctx.fillStyle = colour(m.top1[r][c]);
      ctx.fillRect(c * 16, r * 16, 16, 16);
    }
    ctx.globalAlpha = 1;
    map.addEventListener("mousemove", (e) => {
      const rect = map.getBoundingClientRect();
      const c = Math.floor((e.clientX - rect.left) / rect.width * gw), r = Math.floor((e.clientY - rect.top) / rect.height * gh);
      if (r < 0 || c < 0 || r >= gh || c >= gw) return;
      const lines = m.topk[r][c].map((e2, k) => `expert ${e2}: ${m.weights[r][c][k].toFixed(3)}`);
      const tip = $("#tooltip");
      tip.textContent = `${m.layer}, patch (${r}, ${c})\n${lines.join("\n")}`;
      tip.style.left = `${e.clientX + 12}px`; tip.style.top = `${e.clientY + 12}px`; tip.hidden = false;
    });
    map.addEventListener("mouseleave", () => { $("#tooltip").hidden = true; });
    wrap.append(map, usageChart(m, task));
    layers.append(wrap);
  }
  box.append(layers);
  card.append(box);
}

// Bars per expert: this image's share of selections (solid) beside the run's average (outline).
function usageChart(m, task) {
  const experts = INFO.layers[m.layer].experts;
  const average = ((INFO.usage[m.layer] || {})[task]) || [];
  const allowed = ((INFO.allowed || {})[m.layer] || {})[task] || experts;
  const chart = el("canvas", { class: "usage", title: "selections: this image (filled) vs the run's average (outline); " +
                                                   "grey numbers: experts this task may not choose" });
  chart.width = 400; chart.height = 120;
  const ctx = chart.getContext("2d");
  const w = chart.width / experts.length;
  experts.forEach((e, i) => {
    const here = m.usage[e] || 0, avg = average[e] || 0;
    ctx.fillStyle = colour(e);
    ctx.fillRect(i * w + 2, chart.height - 14 - here * 100, w / 2 - 3, here * 100);
    ctx.strokeStyle = "#333";
    ctx.strokeRect(i * w + w / 2, chart.height - 14 - avg * 100, w / 2 - 3, avg * 100);
    ctx.fillStyle = allowed.includes(e) ? "#333" : "#bbb"; ctx.font = "11px system-ui";
    ctx.fillText(String(e), i * w + w / 2 - 4, chart.height - 2);
  });
  return chart;
}

// ------------------------------------------------------------------ wiring
$("#file-input").addEventListener("change", (e) => { if (e.target.files.length) runFile(e.target.files[0]); });
const zone = $("#drop-zone");
zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (e) => {
  e.preventDefault(); zone.classList.remove("over");
  if (e.dataTransfer.files.length) runFile(e.dataTransfer.files[0]);
});
$("#score-slider").addEventListener("input", (e) => {
  $("#score-value").textContent = parseFloat(e.target.value).toFixed(2);
  if (LAST) render();
});
$("#opacity-slider").addEventListener("input", () => { if (LAST) render(); });
init().catch((e) => showError(`cannot reach the server: ${e.message}`));

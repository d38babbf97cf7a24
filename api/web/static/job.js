"use strict";
// The job page: live state from GET /web/jobs/{id}/events, the checkpoint timeline, and the loss curve
// per scale: the worker's bounded history (the page's data-points), plus the progress seen while the
// page is open (kept in sessionStorage: a reload keeps it), drawn as one small SVG per scale.
(function () {
  const root = document.getElementById("job");
  if (!root) return;
  const jobId = root.dataset.job;
  const base = root.dataset.apiBase;
  const box = document.getElementById("loss");
  const storeKey = "sq-loss-" + jobId;
  const SVG = "http://www.w3.org/2000/svg";
  const W = 260, H = 120, PAD = 26, MAX_POINTS = 4000;
  let points = load();

  function load() {
    let saved = [];
    try { saved = JSON.parse(sessionStorage.getItem(storeKey) || "[]"); } catch (e) { saved = []; }
    const known = JSON.parse(box.dataset.points || "[]");
    known.forEach(function (p) { if (!has(saved, p)) saved.push(p); });
    return saved.sort(function (a, b) { return a[0] - b[0] || a[1] - b[1]; });
  }

  function has(list, p) {
    return list.some(function (q) { return q[0] === p[0] && q[1] === p[1]; });
  }

  function add(progress) {
    if (!progress || progress.loss == null || progress.scale == null || progress.iteration == null) return;
    const p = [progress.scale, progress.iteration, progress.loss];
    if (has(points, p)) return;
    points.push(p);
    if (points.length > MAX_POINTS) points = points.slice(-MAX_POINTS);
    try { sessionStorage.setItem(storeKey, JSON.stringify(points)); } catch (e) { /* full: keep in memory */ }
    draw();
  }

  function el(name, attrs, text) {
    const node = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function plot(scale, series) {
    const log = series.every(function (p) { return p[2] > 0; });
    const ys = series.map(function (p) { return log ? Math.log10(p[2]) : p[2]; });
    const xs = series.map(function (p) { return p[1]; });
    const x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    const y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    const sx = function (x) { return PAD + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (W - PAD - 6); };
    const sy = function (y) { return 8 + (y1 > y0 ? (y1 - y) / (y1 - y0) : 0.5) * (H - PAD - 8); };
    const first = series[0][2], last = series[series.length - 1][2];
    const label = "loss at scale " + (scale + 1) + ": " + first.toPrecision(3) + " to " + last.toPrecision(3) +
      " over iterations " + x0 + " to " + x1;
    const svg = el("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": label,
      class: "loss-plot", "data-scale": scale });
    svg.append(el("title", {}, label));
    svg.append(el("line", { x1: PAD, y1: H - PAD, x2: W - 4, y2: H - PAD, class: "axis", stroke: "#c3c8cd" }));
    svg.append(el("line", { x1: PAD, y1: 6, x2: PAD, y2: H - PAD, class: "axis", stroke: "#c3c8cd" }));
    const path = series.map(function (p, i) { return sx(xs[i]).toFixed(1) + "," + sy(ys[i]).toFixed(1); });
    svg.append(el("polyline", { points: path.join(" "), fill: "none", stroke: "#2457c5", "stroke-width": 1.6 }));
    if (series.length === 1) svg.append(el("circle", { cx: sx(xs[0]), cy: sy(ys[0]), r: 2.5, fill: "#2457c5" }));
    svg.append(el("text", { x: PAD + 4, y: 14 }, "scale " + (scale + 1) + (log ? " (log)" : "")));
    svg.append(el("text", { x: PAD, y: H - 10 }, "it " + x0));
    svg.append(el("text", { x: W - 40, y: H - 10 }, "it " + x1));
    svg.append(el("text", { x: W - 84, y: 14 }, last.toPrecision(3)));
    return svg;
  }

  function draw() {
    box.querySelectorAll("svg").forEach(function (s) { s.remove(); });
    const scales = {};
    points.forEach(function (p) { (scales[p[0]] = scales[p[0]] || []).push(p); });
    Object.keys(scales).map(Number).sort(function (a, b) { return a - b; }).forEach(function (s) {
      box.append(plot(s, scales[s]));
    });
  }

  function timeline(job) {
    const list = document.getElementById("timeline");
    list.textContent = "";
    (job.checkpoints || []).forEach(function (cp) {
      const href = SQ.webLink(cp.preview_url, base);
      if (!href) return;
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.className = "zoom";
      a.href = href;
      const img = document.createElement("img");
      img.src = SQ.webLink(cp.thumb_url, base) || href;  // small; the link opens the full preview
      img.alt = "checkpoint at scale " + ((cp.scale || 0) + 1) + ", iteration " + cp.iteration;
      a.append(img);
      const caption = document.createElement("span");
      caption.textContent = "scale " + ((cp.scale || 0) + 1) + " · iteration " + cp.iteration;
      li.append(a, caption);
      list.append(li);
    });
  }

  function update(job, kind) {
    root.querySelector(".state").textContent = SQ.state(job);
    const pct = SQ.percent(job);
    SQ.setProgress(root.querySelector("progress"), pct);
    root.querySelector(".pct").textContent = pct + " %";
    const eta = job.status === "running" ? SQ.duration(job.progress.eta_seconds) : null;
    root.querySelector(".eta").textContent = eta ? eta + " left" : "";
    const error = root.querySelector(".error");
    error.hidden = !job.error;
    error.textContent = job.error ? job.error.message : "";
    document.getElementById("cancel-job").hidden = SQ.terminal(job.status) || job.cancel_requested;
    document.getElementById("detail-status").textContent = job.status + (job.cancel_requested ? " (cancel requested)" : "");
    if (job.status === "running") add(job.progress);
    if (kind === "checkpoint" || kind === "status") timeline(job);
  }

  draw();
  if (root.dataset.terminal === "true" || !window.EventSource) return;
  const source = new EventSource("/web/jobs/" + encodeURIComponent(jobId) + "/events");
  ["status", "progress", "checkpoint"].forEach(function (kind) {
    source.addEventListener(kind, function (event) { update(JSON.parse(event.data), kind); });
  });
  source.addEventListener("completed", function (event) {
    update(JSON.parse(event.data), "status");
    source.close();
    window.location.reload();  // the result and how it ran are rendered by the server
  });
})();

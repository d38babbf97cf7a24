"use strict";
// The batch page: its grid follows the batch's live events (GET /web/batches/{id}/events, the API's
// Server-Sent Events): state, progress bar, ETA, error and the newest checkpoint's thumbnail per job.
(function () {
  const root = document.getElementById("batch");
  if (!root) return;
  const base = root.dataset.apiBase;
  const live = document.getElementById("live");
  const ORDER = ["queued", "running", "succeeded", "failed", "canceled"];

  // Each job's share of the batch's progress, as GET /v1/batches/{id} counts it: finished 1, running
  // its fraction, queued 0; the bar moves with every job's progress, not only when counts change.
  const shares = {};
  document.querySelectorAll("li.card").forEach(function (card) {
    shares[card.dataset.job] = SQ.terminal(card.dataset.status) ? 1 : card.querySelector("progress").value / 100;
  });

  function overall() {
    const ids = Object.keys(shares);
    if (!ids.length) return;
    const pct = Math.round(100 * ids.reduce(function (sum, id) { return sum + shares[id]; }, 0) / ids.length);
    SQ.setProgress(document.getElementById("batch-progress"), pct);
    document.getElementById("batch-pct").textContent = pct + " %";
  }

  function cardOf(id) {
    return document.querySelector('li.card[data-job="' + CSS.escape(id) + '"]');
  }

  function update(job) {
    const card = cardOf(job.id);
    if (!card) return;
    card.dataset.status = job.status;
    card.className = "card " + job.status;
    card.querySelector(".state").textContent = SQ.state(job);
    SQ.setProgress(card.querySelector("progress"), SQ.percent(job));
    const eta = job.status === "running" ? SQ.duration(job.progress.eta_seconds) : null;
    card.querySelector(".eta").textContent = eta ? eta + " left" : "";
    const error = card.querySelector(".error");
    error.hidden = !job.error;
    error.textContent = job.error ? job.error.message : "";
    const thumb = SQ.webLink(SQ.thumb(job), base);
    if (thumb) {
      const img = card.querySelector("img.preview");
      if (img.getAttribute("src") !== thumb) img.setAttribute("src", thumb);
      img.alt = (job.result_url ? "result" : "latest preview") + " of " + card.querySelector(".title").textContent;
      img.hidden = false;
      card.querySelector(".no-preview").hidden = true;
    }
    card.querySelector("form.cancel").hidden = SQ.terminal(job.status) || job.cancel_requested;
    shares[job.id] = SQ.terminal(job.status) ? 1 : job.status === "running" ? SQ.percent(job) / 100 : 0;
    overall();
  }

  function summary(s) {
    const counts = root.querySelector(".counts");
    counts.textContent = "";
    ORDER.forEach(function (name) {
      const n = s.counts[name] || 0;
      if (!n) return;
      const badge = document.createElement("span");
      badge.className = "badge " + name;
      badge.textContent = n + " " + name;
      counts.append(badge, " ");
    });
    if (s.done) document.getElementById("cancel-batch").hidden = true;
  }

  if (root.dataset.done === "true" || !window.EventSource) return;
  const source = new EventSource("/web/batches/" + encodeURIComponent(root.dataset.batch) + "/events");
  ["status", "progress", "checkpoint"].forEach(function (kind) {
    source.addEventListener(kind, function (event) { update(JSON.parse(event.data)); });
  });
  source.addEventListener("batch", function (event) { summary(JSON.parse(event.data)); });
  source.addEventListener("completed", function (event) {
    summary(JSON.parse(event.data));
    source.close();
    live.hidden = true;
    root.dataset.done = "true";
  });
  source.onopen = function () { live.hidden = false; };
  source.onerror = function () { live.hidden = true; };  // it reconnects by itself (Last-Event-ID)
})();

"use strict";
// Shared by the page's scripts: links, words, the checkpoint zoom dialog, confirmation of deletes.
// Everything shown is set with textContent or attributes, never parsed as HTML.
window.SQ = (function () {
  const TERMINAL = ["succeeded", "failed", "canceled"];

  function csrf() {
    return document.body.dataset.csrf || "";
  }

  // The API's links (/v1/jobs/...) as the page's own (/web/jobs/...), which the session cookie signs
  // in; presigned storage URLs (S3) stay as they are.
  function webLink(url, apiBase) {
    if (!url) return null;
    const prefix = (apiBase || "") + "/v1/jobs/";
    return url.startsWith(prefix) ? "/web/jobs/" + url.slice(prefix.length) : url;
  }

  // What a grid shows of a job (api/web/views.py JobCard.thumb says the same): the result, else the
  // newest checkpoint's preview, each as its small thumbnail, or the full image for an older job.
  function thumb(job) {
    if (job.result_url) return job.result_thumb_url || job.result_url;
    const cps = job.checkpoints || [];
    const latest = cps.length ? cps[cps.length - 1] : null;
    return latest ? latest.thumb_url || latest.preview_url : null;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || seconds < 0) return null;
    const s = Math.round(seconds);
    if (s < 60) return "about " + Math.max(s, 1) + " s";
    if (s < 3600) return "about " + Math.round(s / 60) + " min";
    return "about " + Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
  }

  // The job's state in a sentence (api/web/views.py state_words says the same).
  function state(job) {
    const p = job.progress || {};
    if (job.status === "queued") {
      if (!job.queue) return "queued";
      const ahead = job.queue.position ? job.queue.position + " of your jobs ahead" : "next in line";
      const starts = duration(job.queue.eta_seconds);
      return "queued: " + ahead + (starts ? ", starts in " + starts : "");
    }
    if (job.status === "running") {
      if (job.cancel_requested) return "stopping: cancel requested";
      if (p.scale === null || p.scale === undefined || !p.scales) return "running: starting";
      return "running: scale " + (p.scale + 1) + " of " + p.scales + ", iteration " + (p.iteration || 0) +
        " of " + (p.iterations || 0);
    }
    if (job.status === "failed" && job.error) return "failed: " + job.error.message;
    return job.status;
  }

  function percent(job) {
    const f = (job.progress && job.progress.fraction) || 0;
    return Math.round(100 * Math.min(Math.max(f, 0), 1));
  }

  function terminal(status) {
    return TERMINAL.indexOf(status) >= 0;
  }

  function setProgress(bar, value) {
    bar.value = value;
    bar.textContent = value + " %";
  }

  function wireZoom() {
    const dialog = document.getElementById("zoom-dialog");
    if (!dialog || typeof dialog.showModal !== "function") return;
    document.addEventListener("click", function (event) {
      const link = event.target.closest && event.target.closest("a.zoom");
      if (!link) return;
      event.preventDefault();
      const img = dialog.querySelector("img");
      img.src = link.getAttribute("href");
      img.alt = (link.querySelector("img") || {}).alt || "checkpoint preview";
      dialog.showModal();
    });
  }

  function wireConfirm() {
    document.querySelectorAll("form.confirm").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.dataset.confirm || "Are you sure?")) event.preventDefault();
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    wireZoom();
    wireConfirm();
  });

  return { csrf, webLink, thumb, duration, state, percent, terminal, setProgress };
})();

"use strict";
// The submit page: images dropped or chosen (or picked from earlier uploads), the parameters, the
// estimate (GET /web/estimate: the submission's own checks), and the submit itself: the form's fields
// as POST /v1/batches takes them, sent to POST /web/batches with the page's CSRF token and the form's
// Idempotency-Key (a resend, e.g. after a network error, is answered with the first batch).
(function () {
  const form = document.getElementById("submit-form");
  if (!form) return;
  const chosen = { content: [], style: [] };
  const estimateBox = document.getElementById("estimate");
  const errorBox = document.getElementById("submit-error");
  const button = document.getElementById("submit-button");
  let timer = null;

  function renderChosen(role) {
    const list = document.querySelector("#" + role + "-drop ul.chosen");
    list.querySelectorAll("img").forEach(function (img) { URL.revokeObjectURL(img.src); });
    list.textContent = "";
    chosen[role].forEach(function (file, index) {
      const li = document.createElement("li");
      const img = document.createElement("img");
      img.src = URL.createObjectURL(file);
      img.alt = role + " " + (index + 1) + ": " + file.name;
      const name = document.createElement("span");
      name.textContent = (index + 1) + ". " + file.name;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "small";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", "remove " + file.name);
      remove.addEventListener("click", function () { chosen[role].splice(index, 1); changed(role); });
      li.append(img, name, remove);
      list.append(li);
    });
  }

  function changed(role) {
    renderChosen(role);
    scheduleEstimate();
  }

  function addFiles(role, files) {
    Array.prototype.forEach.call(files, function (file) {
      if (file.type.indexOf("image/") === 0) chosen[role].push(file);
    });
    changed(role);
  }

  ["content", "style"].forEach(function (role) {
    const zone = document.getElementById(role + "-drop");
    const input = document.getElementById(role + "-files");
    input.addEventListener("change", function () { addFiles(role, input.files); input.value = ""; });
    ["dragenter", "dragover"].forEach(function (type) {
      zone.addEventListener(type, function (event) { event.preventDefault(); zone.classList.add("over"); });
    });
    zone.addEventListener("dragleave", function () { zone.classList.remove("over"); });
    zone.addEventListener("drop", function (event) {
      event.preventDefault();
      zone.classList.remove("over");
      if (event.dataTransfer) addFiles(role, event.dataTransfer.files);
    });
  });

  function mode() {
    return form.querySelector('input[name="mode"]:checked').value;
  }

  function params() {
    const out = {};
    form.querySelectorAll("[data-param]").forEach(function (input) {
      const kind = input.dataset.kind, name = input.dataset.param;
      if (kind === "bool") {
        if (input.checked !== input.defaultChecked) out[name] = input.checked;
      } else if (kind === "choice") {
        if (input.value !== input.dataset.default) out[name] = input.value;
      } else if (input.value.trim() !== "") {
        out[name] = Number(input.value);
      }
    });
    return out;
  }

  function picked(name) {
    return Array.prototype.map.call(form.querySelectorAll('input[name="' + name + '"]:checked'), function (b) {
      return b.value;
    });
  }

  function shape() {
    return {
      contents: chosen.content.length + picked("content_id").length,
      styles: chosen.style.length + picked("style_id").length,
      mode: mode(),
      pairs: mode() === "pairs" ? document.getElementById("pairs").value.trim() : "",
      params: JSON.stringify(params()),
    };
  }

  function line(text) {
    const p = document.createElement("p");
    p.textContent = text;
    estimateBox.append(p);
  }

  function showEstimate(e) {
    estimateBox.classList.remove("bad");
    estimateBox.textContent = "";
    line(e.jobs + (e.jobs === 1 ? " job" : " jobs") + ", each in " + e.scales.length + " scale(s) of " +
      e.scales.join(", ") + " px, " + e.iterations.join(" + ") + " iterations.");
    line("Work: " + e.work_per_job.toLocaleString() + " pixel-iterations per job (the limit is " +
      e.max_job_work.toLocaleString() + ").");
    const budget = e.budget_mpi ? " of your daily budget (" + e.used_mpi.toLocaleString() + " of " +
      e.budget_mpi.toLocaleString() + " used today)" : "";
    line("Costs " + e.charge_mpi.toLocaleString() + " megapixel-iterations" + budget + ".");
  }

  function showProblem(text) {
    estimateBox.classList.add("bad");
    estimateBox.textContent = "";
    line(text);
  }

  async function estimate() {
    const s = shape();
    if (!s.contents || !s.styles) {
      estimateBox.classList.remove("bad");
      estimateBox.textContent = "";
      line("Choose content and style images to see the estimate.");
      return;
    }
    const query = new URLSearchParams({ contents: s.contents, styles: s.styles, mode: s.mode, params: s.params });
    if (s.pairs) query.set("pairs", s.pairs);
    try {
      const answer = await fetch("/web/estimate?" + query, { headers: { Accept: "application/json" } });
      const body = await answer.json();
      if (answer.ok) showEstimate(body); else showProblem(body.error ? body.error.message : answer.statusText);
    } catch (e) {
      showProblem("The estimate could not be fetched: " + e.message);
    }
  }

  function scheduleEstimate() {
    clearTimeout(timer);
    timer = setTimeout(estimate, 250);
  }

  form.addEventListener("input", scheduleEstimate);
  form.addEventListener("change", function (event) {
    if (event.target.name === "mode") document.getElementById("pairs-box").hidden = mode() !== "pairs";
    scheduleEstimate();
  });

  function body() {
    const data = new FormData();
    chosen.content.forEach(function (f) { data.append("content", f, f.name); });
    chosen.style.forEach(function (f) { data.append("style", f, f.name); });
    picked("content_id").forEach(function (id) { data.append("content_id", id); });
    picked("style_id").forEach(function (id) { data.append("style_id", id); });
    const s = shape();
    data.append("mode", s.mode);
    if (s.pairs) data.append("pairs", s.pairs);
    if (s.params !== "{}") data.append("params", s.params);
    const priority = document.getElementById("priority").value.trim();
    if (priority) data.append("priority", priority);
    return data;
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    errorBox.hidden = true;
    button.disabled = true;
    button.textContent = "Submitting…";
    try {
      const answer = await fetch(form.action, {
        method: "POST",
        body: body(),
        headers: { "X-CSRF-Token": SQ.csrf(), "Idempotency-Key": form.dataset.idempotencyKey, Accept: "application/json" },
      });
      const reply = await answer.json();
      if (answer.ok) {
        window.location.assign("/web/batches/" + encodeURIComponent(reply.id));
        return;
      }
      errorBox.textContent = reply.error ? reply.error.message : "The batch was refused (" + answer.status + ").";
    } catch (e) {
      errorBox.textContent = "The batch could not be sent (" + e.message + "): submit again; it is not created twice.";
    }
    errorBox.hidden = false;
    button.disabled = false;
    button.textContent = "Submit batch";
  });

  // Back to a page restored from the cache: a fresh form (and Idempotency-Key) for a new batch.
  window.addEventListener("pageshow", function (event) { if (event.persisted) window.location.reload(); });
})();

// DHR-CLIP operator console: live line view, image layer toggles, review-queue keyboard shortcuts, confirmations.
// Hand-written, no dependencies; every page works without it except for the live refresh and the shortcuts.
"use strict";

const POLL_MS = 1500;

function liveView(box) {
  const state = document.getElementById("live-state");
  let busy = false;
  async function poll() {
    if (busy) return;
    busy = true;
    try {
      const r = await fetch(box.dataset.src, { headers: { "X-Console-Fragment": "1" }, credentials: "same-origin" });
      if (r.status === 401) { window.location.reload(); return; }
      if (!r.ok) throw new Error(String(r.status));
      const html = await r.text();
      if (html !== box.dataset.last) { box.innerHTML = html; box.dataset.last = html; }
      state.textContent = "live · " + new Date().toLocaleTimeString();
      state.classList.remove("stale");
    } catch (err) {
      state.textContent = "connection lost, retrying";
      state.classList.add("stale");
    } finally {
      busy = false;
    }
  }
  setInterval(poll, POLL_MS);
}

function layerControls() {
  const slider = document.getElementById("opacity");
  const layers = document.querySelectorAll("img[data-layer]");
  function setOpacity() { layers.forEach((img) => { img.style.opacity = String(slider.value / 100); }); }
  document.querySelectorAll(".layer-toggle").forEach((box) => {
    const target = document.getElementById(box.dataset.target);
    const apply = () => { target.hidden = !box.checked; };
    box.addEventListener("change", apply);
    apply();
  });
  if (slider) { slider.addEventListener("input", setOpacity); setOpacity(); }
}

function queueKeys(table) {
  const rows = () => Array.from(table.querySelectorAll("tbody tr"));
  let i = 0;
  function select(n) {
    const all = rows();
    if (!all.length) return;
    i = Math.max(0, Math.min(all.length - 1, n));
    all.forEach((r, k) => r.classList.toggle("selected", k === i));
    all[i].scrollIntoView({ block: "nearest" });
  }
  function decide(value) {
    const row = rows()[i];
    if (row) row.querySelector(`button[value="${value}"]`).click();
  }
  document.addEventListener("keydown", (e) => {
    if (e.target.closest("input, textarea, select") || e.ctrlKey || e.metaKey || e.altKey) return;
    const actions = {
      j: () => select(i + 1), ArrowDown: () => select(i + 1),
      k: () => select(i - 1), ArrowUp: () => select(i - 1),
      o: () => rows()[i] && rows()[i].querySelector("a.open").click(),
      Enter: () => rows()[i] && rows()[i].querySelector("a.open").click(),
      c: () => decide("confirm_defect"),
      f: () => decide("false_reject"),
    };
    if (actions[e.key]) { e.preventDefault(); actions[e.key](); }
  });
}

function confirmForms() {
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (e) => { if (!window.confirm(form.dataset.confirm)) e.preventDefault(); });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  confirmForms();
  const live = document.getElementById("live");
  if (live) liveView(live);
  if (document.querySelector(".layer-toggle")) layerControls();
  const queue = document.getElementById("queue");
  if (queue) queueKeys(queue);
});

// siterecovery console: reloads a page of things in motion every data-refresh seconds
// (the pages read fine without it: reload by hand). The operator can pause it (WCAG
// 2.2.1, timing adjustable; the choice lasts for the browser tab), and a page is never
// reloaded while a form on it has the focus or holds something typed.
"use strict";
(function () {
  var body = document.body;
  var seconds = Number(body.getAttribute("data-refresh"));
  var button = document.getElementById("refresh-toggle");
  var status = document.getElementById("refresh-status");
  if (!seconds || !button || !status) { return; }
  var KEY = "siterecovery-console-refresh-paused";
  var edited = false;
  document.addEventListener("input", function () { edited = true; });

  function paused() { return sessionStorage.getItem(KEY) === "1"; }

  function show() {
    var p = paused();
    button.textContent = p ? "Resume auto-refresh" : "Pause auto-refresh";
    button.setAttribute("aria-pressed", p ? "true" : "false");
    status.textContent = p ? "Auto-refresh is paused." :
      "This page refreshes every " + seconds + " s.";
  }

  function tick() {
    var active = document.activeElement;
    var busy = edited || (active && active.closest && active.closest("form"));
    if (!paused() && !busy) { window.location.reload(); return; }
    window.setTimeout(tick, seconds * 1000);
  }

  button.hidden = false;
  button.addEventListener("click", function () {
    sessionStorage.setItem(KEY, paused() ? "0" : "1");
    show();
  });
  show();
  window.setTimeout(tick, seconds * 1000);
})();

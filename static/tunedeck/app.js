// Small page behaviour shared by every page: the phone menu, and the job form's automatic values as placeholders.
(function () {
  "use strict";
  function setUpMenu() {
    const toggle = document.getElementById("menu-toggle");
    const header = document.getElementById("top");
    if (!toggle || !header) return;
    toggle.addEventListener("click", function () {
      const open = header.classList.toggle("open");
      toggle.setAttribute("aria-expanded", open ? "true" : "false");
    });
  }

  // The plan preview carries the values the selector chose (data-auto-* on #plan-auto); the override inputs that
  // are left empty show them as placeholders, so a user sees what "automatic" means before typing.
  function showAutomaticValues() {
    const source = document.getElementById("plan-auto");
    const form = document.getElementById("job-form");
    if (!source || !form) return;
    for (const [key, raw] of Object.entries(source.dataset)) {
      if (!key.startsWith("auto")) continue;
      const field = key.slice(4).replace(/[A-Z]/g, (c) => "_" + c.toLowerCase()).replace(/^_/, "");
      const input = form.querySelector("input[name='" + field + "']");
      if (input && raw !== "") input.placeholder = "auto: " + raw;
    }
  }

  document.addEventListener("DOMContentLoaded", function () { setUpMenu(); showAutomaticValues(); });
  document.addEventListener("htmx:afterSwap", showAutomaticValues);
})();

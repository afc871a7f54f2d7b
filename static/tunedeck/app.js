// Small page behaviour shared by every page: the phone menu, the job form's automatic values as placeholders, and
// the hint on a table box that scrolls sideways.
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

  // A table wider than its box scrolls inside it; the box is then marked (its first column stays in view, see
  // app.css) and a line above it says so, so no column is cut off without the reader knowing there is more.
  function markScrollingBoxes() {
    for (const box of document.querySelectorAll(".scroll")) {
      const overflowing = box.scrollWidth > box.clientWidth + 1;
      box.classList.toggle("overflowing", overflowing);
      let hint = box.previousElementSibling;
      if (!(hint && hint.classList.contains("scroll-hint"))) hint = null;
      if (overflowing && !hint) {
        hint = document.createElement("p");
        hint.className = "scroll-hint";
        hint.textContent = "Scroll sideways for more columns";
        box.before(hint);
      } else if (!overflowing && hint) {
        hint.remove();
      }
    }
  }

  document.addEventListener("DOMContentLoaded", function () { setUpMenu(); showAutomaticValues(); markScrollingBoxes(); });
  document.addEventListener("htmx:afterSwap", showAutomaticValues);
  document.addEventListener("htmx:afterSettle", markScrollingBoxes);
  document.addEventListener("toggle", markScrollingBoxes, true);  // a table inside a <details> just opened
  window.addEventListener("resize", markScrollingBoxes);
})();

/* Tunedeck search trials chart (issue 20): every trial's validation-loss curve on one Chart.js chart.
 *
 * <canvas data-trials-chart data-url=".../trials.json">: fetched on load and every 3 s while the job is active.
 * Complete trials in colour, pruned and failed ones faded, the winner bold and labelled. The canvas carries
 * data-trials (how many curves it shows) and data-winner (the winner's number, or "").
 */
(function () {
  "use strict";

  var COLORS = ["#2f5bd3", "#d9480f", "#2b8a3e", "#9c36b5", "#e67700", "#0c8599", "#5c7cfa", "#c2255c"];

  function fade(hex, alpha) {
    var n = parseInt(hex.slice(1), 16);
    return "rgba(" + ((n >> 16) & 255) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + alpha + ")";
  }

  function dataset(trial) {
    var color = COLORS[trial.number % COLORS.length];
    var faded = trial.state === "pruned" || trial.state === "failed";
    var points = (trial.curve || []).map(function (p) { return { x: p[0], y: p[1] }; });
    return {
      label: "trial " + trial.number + (trial.winner ? " (winner)" : faded ? " (" + trial.state + ")" : ""),
      data: points,
      borderColor: trial.winner ? "#111827" : faded ? fade(color, 0.25) : color,
      backgroundColor: trial.winner ? "#111827" : faded ? fade(color, 0.25) : color,
      borderWidth: trial.winner ? 3.5 : faded ? 1 : 1.6,
      borderDash: faded ? [4, 3] : [],
      pointRadius: trial.winner ? 3 : 1.5,
      order: trial.winner ? 0 : 1,
    };
  }

  function draw(canvas, data) {
    var trials = (data.trials || []).filter(function (t) { return (t.curve || []).length; });
    var datasets = trials.map(dataset);
    if (canvas._chart) {
      canvas._chart.data.datasets = datasets;
      canvas._chart.update("none");
    } else {
      canvas._chart = new window.Chart(canvas, {
        type: "line",
        data: { datasets: datasets },
        options: {
          animation: false, parsing: false, responsive: true, maintainAspectRatio: false,
          scales: {
            x: { type: "linear", title: { display: true, text: "step" }, ticks: { precision: 0 } },
            y: { type: "linear", title: { display: true, text: "validation loss" } },
          },
          plugins: { legend: { display: true, labels: { boxWidth: 12 } } },
        },
      });
    }
    canvas.dataset.trials = String(datasets.length);
    canvas.dataset.winner = data.winner === null || data.winner === undefined ? "" : String(data.winner);
  }

  function load(canvas) {
    fetch(canvas.dataset.url, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.json(); })
      .then(function (data) {
        draw(canvas, data);
        if (data.active) setTimeout(function () { load(canvas); }, 3000);
      })
      .catch(function () { setTimeout(function () { load(canvas); }, 5000); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (typeof window.Chart === "undefined") return;
    document.querySelectorAll("canvas[data-trials-chart]").forEach(load);
  });
})();

/* Tunedeck charts: Chart.js line charts (static/vendor/chartjs, installed by npm) fed by JSON endpoints.
 *
 * <div data-job-charts data-url=".../metrics.json"> with <canvas data-chart="loss|lr|speed|memory"> inside:
 *   fetched on load, again every time htmx swaps in a new #job-live block while the job runs, and once more
 *   when it stops. Each canvas carries data-points (how many points it shows) and data-last-step.
 * <div data-compare-chart data-source="curves-id"> with one canvas: loss curves of several versions overlaid.
 */
(function () {
  "use strict";

  var COLORS = ["#2f5bd3", "#d9480f", "#2b8a3e", "#9c36b5", "#e67700", "#0c8599"];
  var GIB = 1024 * 1024 * 1024;

  function available() {
    return typeof window.Chart !== "undefined";
  }

  function xy(steps, values, scale) {
    var out = [];
    for (var i = 0; i < steps.length; i++) {
      var v = values ? values[i] : null;
      if (v !== null && v !== undefined && isFinite(v)) out.push({ x: steps[i], y: scale ? v / scale : v });
    }
    return out;
  }

  // Small numbers (learning rates) read better as 2.0e-4 than as 0.000200000; with as many digits as it takes
  // for neighbouring ticks to read differently (2.05e-4, 2.10e-4, not 2.1e-4 twice).
  function tickLabel(value, index, ticks) {
    var v = Number(value);
    if (v === 0 || Math.abs(v) >= 0.01) return Math.round(v * 1000) / 1000;
    var values = (ticks || []).map(function (t) { return Number(t.value); });
    for (var digits = 1; digits < 6; digits++) {
      var labels = values.map(function (x) { return x.toExponential(digits); });
      if (new Set(labels).size === labels.length) return v.toExponential(digits);
    }
    return v.toExponential(6);
  }

  function lineChart(canvas, datasets, yLabel) {
    return new window.Chart(canvas, {
      type: "line",
      data: { datasets: datasets },
      options: {
        animation: false,
        parsing: false,
        normalized: true,
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "nearest", axis: "x", intersect: false },
        elements: { point: { radius: 0 }, line: { borderWidth: 1.6, tension: 0 } },
        scales: {
          x: { type: "linear", title: { display: true, text: "step" }, ticks: { precision: 0 } },
          y: { type: "linear", title: { display: !!yLabel, text: yLabel || "" }, ticks: { callback: tickLabel } },
        },
        plugins: { legend: { display: datasets.length > 1, labels: { boxWidth: 12 } } },
      },
    });
  }

  function series(label, color, data, extra) {
    var ds = { label: label, data: data, borderColor: color, backgroundColor: color, spanGaps: true };
    for (var k in extra || {}) ds[k] = extra[k];
    return ds;
  }

  var BUILDERS = {
    loss: function (s) {
      return {
        yLabel: "loss",
        datasets: [
          series("train loss", COLORS[0], xy(s.step, s.train_loss)),
          series("validation loss", COLORS[1], xy(s.step, s.eval_loss), { pointRadius: 2.5, borderDash: [5, 3] }),
        ],
        count: Math.max(xy(s.step, s.train_loss).length, xy(s.step, s.eval_loss).length),
      };
    },
    lr: function (s) {
      var d = xy(s.step, s.learning_rate);
      return { yLabel: "learning rate", datasets: [series("learning rate", COLORS[2], d)], count: d.length };
    },
    speed: function (s) {
      var d = xy(s.step, s.tokens_per_second);
      return { yLabel: "tokens/s", datasets: [series("tokens/s", COLORS[3], d)], count: d.length };
    },
    memory: function (s, data) {
      var d = xy(s.step, s.memory_bytes, GIB);
      var sets = [series("memory used (GiB)", COLORS[4], d)];
      if (data.plan_memory_bytes && s.step.length) {
        var first = s.step[0], last = s.step[s.step.length - 1];
        sets.push(series("plan estimate", COLORS[5], [{ x: first, y: data.plan_memory_bytes / GIB },
          { x: last, y: data.plan_memory_bytes / GIB }], { borderDash: [2, 2] }));
      }
      return { yLabel: "GiB", datasets: sets, count: d.length };
    },
  };

  function JobCharts(root) {
    this.root = root;
    this.url = root.getAttribute("data-url");
    this.charts = {};
    this.busy = false;
    this.last = 0;
    this.finalDone = false;
  }

  JobCharts.prototype.refresh = function (force) {
    var self = this;
    var now = Date.now();
    // At most every 0.9 s, and never more than a tenth of the time on fetching (big jobs cost more to chart).
    if (self.busy || (!force && now - self.last < Math.max(900, 10 * (self.cost || 0)))) return;
    self.busy = true;
    self.last = now;
    fetch(self.url, { credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (data) { self.render(data); })
      .catch(function () {})
      .then(function () { self.busy = false; self.cost = Date.now() - now; });
  };

  JobCharts.prototype.render = function (data) {
    var s = data.series || { step: [] };
    var empty = this.root.querySelector("[data-chart-empty]");
    if (empty) empty.hidden = (data.count || 0) > 0;
    this.root.setAttribute("data-status", data.status || "");
    var canvases = this.root.querySelectorAll("canvas[data-chart]");
    for (var i = 0; i < canvases.length; i++) {
      var canvas = canvases[i];
      var kind = canvas.getAttribute("data-chart");
      if (!BUILDERS[kind]) continue;
      var built = BUILDERS[kind](s, data);
      var chart = this.charts[kind];
      if (!chart) {
        this.charts[kind] = lineChart(canvas, built.datasets, built.yLabel);
      } else {
        for (var j = 0; j < built.datasets.length; j++) {
          if (chart.data.datasets[j]) chart.data.datasets[j].data = built.datasets[j].data;
          else chart.data.datasets.push(built.datasets[j]);
        }
        chart.update("none");
      }
      canvas.setAttribute("data-points", String(built.count));
      canvas.setAttribute("data-last-step", String(s.step.length ? s.step[s.step.length - 1] : 0));
    }
  };

  function liveActive() {
    var live = document.getElementById("job-live");
    return live && live.getAttribute("data-active") === "1";
  }

  function initJobCharts() {
    var roots = document.querySelectorAll("[data-job-charts]");
    var all = [];
    for (var i = 0; i < roots.length; i++) {
      if (!available()) {
        var note = roots[i].querySelector("[data-chart-empty]");
        if (note) { note.hidden = false; note.textContent = "Charts need chart.js: run scripts/setup.sh (npm install)."; }
        continue;
      }
      var jc = new JobCharts(roots[i]);
      jc.refresh(true);
      all.push(jc);
    }
    if (!all.length) return;
    // htmx swaps in a fresh #job-live block on every poll: refresh the charts with it.
    document.body.addEventListener("htmx:load", function (event) {
      var el = event.target;
      if (!el || (el.id !== "job-live" && !(el.querySelector && el.querySelector("#job-live")))) return;
      all.forEach(function (jc) {
        if (liveActive()) jc.refresh(false);
        else if (!jc.finalDone) { jc.finalDone = true; jc.refresh(true); }
      });
    });
  }

  function initCompareCharts() {
    if (!available()) return;
    var roots = document.querySelectorAll("[data-compare-chart]");
    for (var i = 0; i < roots.length; i++) {
      var source = document.getElementById(roots[i].getAttribute("data-source"));
      var canvas = roots[i].querySelector("canvas");
      if (!source || !canvas) continue;
      var curves = JSON.parse(source.textContent);
      var datasets = [];
      var total = 0;
      curves.forEach(function (c, k) {
        // A single version's train and validation curves get two colours; several versions one colour each
        // (validation dashed), so the legend tells them apart either way.
        var color = COLORS[(curves.length === 1 ? 0 : k) % COLORS.length];
        var evalColor = curves.length === 1 ? COLORS[1 % COLORS.length] : color;
        var train = xy(c.steps, c.train_loss);
        var evalPoints = xy(c.steps, c.eval_loss);
        total += train.length + evalPoints.length;
        datasets.push(series(c.label + " train", color, train));
        if (evalPoints.length) {
          datasets.push(series(c.label + " validation", evalColor, evalPoints, { borderDash: [5, 3], pointRadius: 2.5 }));
        }
      });
      var chart = lineChart(canvas, datasets, "loss");
      chart.options.plugins.legend.display = true;
      chart.update("none");
      canvas.setAttribute("data-points", String(total));
      canvas.setAttribute("data-series", String(datasets.length));
    }
  }

  function init() {
    initJobCharts();
    initCompareCharts();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();

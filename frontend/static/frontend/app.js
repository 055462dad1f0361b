/* Flotilla dashboard: live refresh over a websocket, polling when it is closed, charts. */
(function () {
  "use strict";
  var body = document.body;
  var topics = (body.getAttribute("data-topics") || "").trim();
  var socket = null;
  var socketOpen = false;
  var retryMs = 1000;
  var pending = new WeakMap();

  // htmx evaluates this in `every 5s [flotillaPoll()]`: poll only while the socket is down.
  window.flotillaPoll = function () { return !socketOpen; };

  function setIndicator(state) {
    var el = document.getElementById("live-indicator");
    if (!el) { return; }
    el.setAttribute("data-state", state);
    el.textContent = state === "live" ? "live" : (state === "polling" ? "polling" : "");
  }

  function refreshTopic(topic) {
    var nodes = document.querySelectorAll("[data-live]");
    for (var i = 0; i < nodes.length; i++) {
      var el = nodes[i];
      var wanted = el.getAttribute("data-live").split(/\s+/);
      if (topic !== "*" && wanted.indexOf(topic) < 0) { continue; }
      if (pending.has(el)) { continue; }
      // A burst of events (fifty devices enrolling) becomes one refresh per region.
      pending.set(el, window.setTimeout(function (target) {
        pending.delete(target);
        if (document.body.contains(target)) { htmx.trigger(target, "live"); }
      }, 300, el));
    }
  }

  function connect() {
    if (!topics) { return; }  // a page without live regions
    if (!("WebSocket" in window)) { setIndicator("polling"); return; }
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + window.location.host + "/ws/live/?topics=" + encodeURIComponent(topics));
    socket.onopen = function () {
      var wasReconnect = retryMs > 1000;
      socketOpen = true;
      retryMs = 1000;
      setIndicator("live");
      // Events sent while the socket was down are lost: refresh everything once.
      if (wasReconnect) { refreshTopic("*"); }
    };
    socket.onmessage = function (message) {
      var data;
      try { data = JSON.parse(message.data); } catch (err) { return; }
      if (data && data.type === "event") { refreshTopic(data.topic); }
    };
    socket.onclose = function () {
      socketOpen = false;
      setIndicator("polling");
      window.setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 30000);
    };
  }

  var palette = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777",
    "#65a30d", "#ea580c", "#475569"];

  function drawChart(canvas) {
    if (typeof Chart === "undefined") { return; }
    var spec;
    try { spec = JSON.parse(canvas.getAttribute("data-chart")); } catch (err) { return; }
    var old = Chart.getChart(canvas);
    if (old) { old.destroy(); }
    var scatter = spec.kind === "scatter";
    var dense = spec.labels && spec.labels.length > 40;
    var datasets = spec.series.map(function (s, i) {
      var color = s.color || palette[i % palette.length];
      return {
        label: s.label, data: s.data, borderColor: color, backgroundColor: color,
        borderWidth: 1.5, pointRadius: scatter || dense ? 0 : 2, showLine: true, tension: 0,
        spanGaps: true, yAxisID: s.axis || "y", borderDash: s.dash ? [5, 4] : undefined,
      };
    });
    var scales = {
      x: scatter ? { type: "linear", min: 0, max: 1, title: { display: !!spec.x_label, text: spec.x_label } }
                 : { title: { display: !!spec.x_label, text: spec.x_label }, ticks: { maxTicksLimit: 8 } },
      y: { title: { display: !!spec.y_label, text: spec.y_label }, min: spec.y_min, max: spec.y_max },
    };
    if (spec.y2_label) {
      scales.y2 = { position: "right", grid: { drawOnChartArea: false },
        title: { display: true, text: spec.y2_label } };
    }
    new Chart(canvas, {
      type: scatter ? "scatter" : (spec.kind || "line"),
      data: { labels: spec.labels, datasets: datasets },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false,
        interaction: { mode: "nearest", intersect: false },
        // Many curves (ROC per class) would bury the plot under the legend: tooltips name them.
        plugins: { legend: { display: datasets.length > 1 && datasets.length <= 6, labels: { boxWidth: 12 } } },
        scales: scales,
      },
    });
  }

  htmx.onLoad(function (root) {
    var canvases = root.querySelectorAll ? root.querySelectorAll("canvas[data-chart]") : [];
    for (var i = 0; i < canvases.length; i++) { drawChart(canvases[i]); }
  });
  document.addEventListener("htmx:beforeCleanupElement", function (evt) {
    var el = evt.target;
    if (el && el.tagName === "CANVAS" && typeof Chart !== "undefined") {
      var chart = Chart.getChart(el);
      if (chart) { chart.destroy(); }
    }
  });

  // A refresh the server refused must not fail silently: the region would freeze.
  document.addEventListener("htmx:responseError", function (evt) {
    var xhr = evt.detail && evt.detail.xhr;
    console.error("live refresh failed: HTTP " + (xhr ? xhr.status : "?") + " for " +
      (evt.detail && evt.detail.pathInfo ? evt.detail.pathInfo.requestPath : ""));
  });

  // Copy buttons (enrollment command, tokens).
  document.addEventListener("click", function (evt) {
    var button = evt.target.closest ? evt.target.closest("[data-copy]") : null;
    if (!button) { return; }
    var source = document.getElementById(button.getAttribute("data-copy"));
    if (source && navigator.clipboard) {
      navigator.clipboard.writeText(source.textContent.trim()).then(function () {
        button.textContent = "Copied";
      }, function () { button.textContent = "Select and copy"; });
    }
  });

  connect();
})();

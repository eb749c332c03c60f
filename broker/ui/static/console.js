// The security console's own script: copy buttons, the live tail and the activity charts.
// No third-party code, no inline handlers (the pages' CSP allows only this file), and no
// HTML built from strings except the rows the broker itself rendered (autoescaped).
"use strict";

(function () {
  var SVG = "http://www.w3.org/2000/svg";
  var PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

  function copyButtons() {
    document.querySelectorAll("[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        var field = document.getElementById(button.getAttribute("data-copy"));
        field.select();
        var done = function () { button.textContent = "Copied"; };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(field.value).then(done, function () {
            document.execCommand("copy"); done();
          });
        } else {
          document.execCommand("copy");
          done();
        }
      });
    });
  }

  function liveTail() {
    var box = document.getElementById("live-tail");
    var body = document.querySelector("#events tbody");
    if (!box || !body) { return; }
    var after = Number(box.getAttribute("data-after")) || 0;
    var timer = null;
    function poll() {
      var url = new URL(box.getAttribute("data-src"), window.location.href);
      url.searchParams.set("after", String(after));
      fetch(url.toString(), { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) {
          if (response.redirected || !response.ok) { throw new Error("tail stopped"); }
          return response.json();
        })
        .then(function (data) {
          after = Math.max(after, data.last_seq);
          if (!data.rows.trim()) { return; }
          var parsed = new DOMParser().parseFromString(
            "<table><tbody>" + data.rows + "</tbody></table>", "text/html");
          var rows = parsed.querySelectorAll("tbody tr");
          for (var i = rows.length - 1; i >= 0; i -= 1) {
            var row = document.importNode(rows[i], true);
            row.classList.add("fresh");
            body.insertBefore(row, body.firstChild);
          }
        })
        .catch(function () { box.checked = false; stop(); });
    }
    function stop() { if (timer !== null) { clearInterval(timer); timer = null; } }
    box.addEventListener("change", function () {
      if (box.checked) { poll(); timer = setInterval(poll, 3000); } else { stop(); }
    });
  }

  function el(name, attributes, text) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attributes).forEach(function (key) { node.setAttribute(key, attributes[key]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  // The log view of one bar: its series' filter over its bucket's time window.
  function barLink(filter, start, seconds) {
    var url = new URL("/broker/ui/audit", window.location.href);
    Object.keys(filter).forEach(function (key) { url.searchParams.set(key, filter[key]); });
    var since = new Date(start);
    url.searchParams.set("since", since.toISOString());
    url.searchParams.set("until", new Date(since.getTime() + seconds * 1000).toISOString());
    return url.pathname + url.search;
  }

  // A stacked bar chart: one bar per time bucket, one colour per series; a bar links to
  // its calls in the log (``filterOf`` gives a series' filter, or null for none).
  function stackedBars(figure, buckets, series, seconds, filterOf) {
    var names = Object.keys(series);
    var width = 860, height = 220, left = 48, bottom = 28, top = 10;
    var totals = buckets.map(function (_, i) {
      return names.reduce(function (sum, name) { return sum + series[name][i]; }, 0);
    });
    var max = Math.max(1, Math.max.apply(null, totals));
    var svg = el("svg", { viewBox: "0 0 " + width + " " + (height + 20 * Math.ceil(names.length / 4)),
      role: "img", "class": "bars" });
    var plot = height - bottom - top;
    var step = (width - left) / buckets.length;
    svg.appendChild(el("line", { x1: left, y1: top + plot, x2: width, y2: top + plot, stroke: "#888" }));
    svg.appendChild(el("text", { x: left - 6, y: top + 10, "text-anchor": "end", "class": "axis" }, String(Math.round(max * 100) / 100)));
    svg.appendChild(el("text", { x: left - 6, y: top + plot, "text-anchor": "end", "class": "axis" }, "0"));
    svg.appendChild(el("text", { x: left, y: height - 8, "class": "axis" }, buckets[0].slice(0, 16).replace("T", " ")));
    svg.appendChild(el("text", { x: width, y: height - 8, "text-anchor": "end", "class": "axis" },
      buckets[buckets.length - 1].slice(0, 16).replace("T", " ") + " UTC"));
    buckets.forEach(function (start, i) {
      var y = top + plot;
      names.forEach(function (name, n) {
        var value = series[name][i];
        if (!value) { return; }
        var h = value / max * plot;
        y -= h;
        var bar = el("rect", { x: left + i * step + 1, y: y, width: Math.max(1, step - 2), height: h,
          fill: PALETTE[n % PALETTE.length], "class": "bar" });
        bar.appendChild(el("title", {}, name + ": " + value + " at " + start.slice(0, 16).replace("T", " ")));
        var filter = filterOf(name);
        if (filter) {
          var link = el("a", { href: barLink(filter, start, seconds), "class": "bar-link" });
          link.appendChild(bar);
          svg.appendChild(link);
        } else {
          svg.appendChild(bar);
        }
      });
    });
    names.forEach(function (name, n) {
      var x = left + (n % 4) * 200, y = height + 12 + 20 * Math.floor(n / 4);
      svg.appendChild(el("rect", { x: x, y: y - 10, width: 12, height: 12, fill: PALETTE[n % PALETTE.length] }));
      svg.appendChild(el("text", { x: x + 16, y: y, "class": "legend" }, name));
    });
    figure.textContent = "";
    if (!names.length) {
      figure.textContent = "Nothing in this window.";
      return;
    }
    figure.appendChild(svg);
  }

  function activity() {
    var root = document.getElementById("activity");
    if (!root) { return; }
    fetch(root.getAttribute("data-src"), { credentials: "same-origin" })
      .then(function (response) { return response.json(); })
      .then(function (data) {
        stackedBars(document.getElementById("chart-calls"), data.buckets, data.calls_per_client,
          data.bucket_seconds, function (name) {
            return name === "(no client)" ? { kind: "proxy" } : { kind: "proxy", client: name };
          });
        stackedBars(document.getElementById("chart-refusals"), data.buckets,
          data.refusals_per_reason, data.bucket_seconds, function (reason) {
            return reason === "unknown" ? { kind: "proxy", decision: "deny" }
              : { kind: "proxy", decision: "deny", reason: reason };
          });
        stackedBars(document.getElementById("chart-cost"), data.buckets,
          data.canvas_cost_per_client, data.bucket_seconds, function (name) {
            return name === "(no client)" ? null : { kind: "proxy", client: name };
          });
        var body = document.querySelector("#per-client tbody");
        data.clients.forEach(function (client) {
          var row = document.createElement("tr");
          var name = document.createElement("td");
          if (client.client_id) {
            var link = document.createElement("a");
            link.href = "/broker/ui/audit?client=" + encodeURIComponent(client.client_id);
            link.textContent = client.name;
            name.appendChild(link);
          } else {
            name.textContent = client.name;
          }
          row.appendChild(name);
          [client.calls, client.refused, client.canvas_cost].forEach(function (value) {
            var cell = document.createElement("td");
            cell.textContent = String(value);
            row.appendChild(cell);
          });
          body.appendChild(row);
        });
        root.setAttribute("data-drawn", "true");
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    copyButtons();
    liveTail();
    activity();
  });
}());

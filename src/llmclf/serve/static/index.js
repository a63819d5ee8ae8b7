// The page's script (a file, not inline: the Content-Security-Policy allows this origin's files only).
// Every text from the server or the user (labels, texts, errors) goes into the page with textContent, never as HTML.
(function () {
  "use strict";
  var config = JSON.parse(document.getElementById("llmclf-config").textContent);
  var $ = function (id) { return document.getElementById(id); };
  var form = $("form"), textsEl = $("texts"), keyEl = $("api-key"), mcEl = $("mc"), thrEl = $("threshold");
  var explainEl = $("explain");
  var button = $("classify"), errorEl = $("error"), resultsEl = $("results"), statusEl = $("status");

  $("model-line").textContent = "Model " + (config.backbone || "(unnamed)") + " \u00b7 labels: " +
    config.labels.join(", ") + " \u00b7 up to " + config.max_texts + " texts per request";
  if (config.long_text && config.long_text !== "truncate") {  // --long-text chunk: say how long texts are read
    $("model-line").textContent += " \u00b7 long texts: every window classified (" + config.long_text + ", " +
      config.aggregate + "), up to " + config.max_chars + " characters per text";
  }
  if (config.auth) {  // without a key on the server, the page neither shows nor mentions one
    $("key-field").hidden = false;
    keyEl.placeholder = "required by this server";
    try { keyEl.value = sessionStorage.getItem("llmclf-api-key") || ""; } catch (e) { /* storage off */ }
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function pct(p) { return (100 * p).toFixed(1) + "%"; }

  function showError(message) {
    errorEl.textContent = message;
    errorEl.style.display = message ? "block" : "none";
  }

  // The text with each attributed piece in a span coloured by its attribution (green: for the label, red:
  // against; stronger = larger), gaps as plain text. Offsets count code points, as Python's do.
  function highlighted(text, explanation) {
    var chars = Array.from(text), node = el("p", "text explained"), at = 0;
    var largest = Math.max.apply(null, explanation.tokens.map(function (t) { return Math.abs(t.attribution); })
      .concat([1e-12]));
    node.setAttribute("data-testid", "explained");
    explanation.tokens.forEach(function (t) {
      if (t.start > at) node.appendChild(document.createTextNode(chars.slice(at, t.start).join("")));
      var span = el("span", "tok", chars.slice(t.start, t.end).join(""));
      var strength = Math.min(1, Math.abs(t.attribution) / largest);
      span.style.backgroundColor = (t.attribution >= 0 ? "rgba(30, 160, 70, " : "rgba(220, 50, 50, ") +
        (0.08 + 0.6 * strength).toFixed(3) + ")";
      span.setAttribute("data-testid", "token");
      span.setAttribute("data-attribution", String(t.attribution));
      span.title = (t.attribution >= 0 ? "+" : "") + t.attribution.toFixed(4);
      node.appendChild(span);
      at = Math.max(at, t.end);
    });
    if (at < chars.length) node.appendChild(document.createTextNode(chars.slice(at).join("")));
    return node;
  }

  function render(texts, results) {
    resultsEl.textContent = "";
    results.forEach(function (r, i) {
      var card = el("article", "result");
      card.setAttribute("data-testid", "result");
      var text = r.explanation ? highlighted(texts[i], r.explanation) : el("p", "text", texts[i]);
      if (!r.explanation) text.title = texts[i];
      card.appendChild(text);
      var head = el("div", "head");
      if (r.labels) {  // multi-label: a chip per label that reached its threshold
        r.labels.forEach(function (name) {
          var chip = el("span", "label chip", name + " " + pct(r.probabilities[name]));
          chip.setAttribute("data-testid", "chip");
          head.appendChild(chip);
        });
      } else {
        var label = el("span", "label", r.label);
        label.setAttribute("data-testid", "label");
        head.appendChild(label);
        head.appendChild(el("span", "", pct(r.probabilities[r.label])));
      }
      if (r.confident === false) head.appendChild(el("span", "badge unsure", "below threshold"));
      else if (r.confident === true) head.appendChild(el("span", "badge", "confident"));
      card.appendChild(head);
      var bars = el("div", "bars");
      Object.keys(r.probabilities).sort(function (a, b) { return r.probabilities[b] - r.probabilities[a]; })
        .forEach(function (name) {
          var chosen = r.labels ? r.labels.indexOf(name) >= 0 : name === r.label;
          var p = r.probabilities[name], top = chosen ? " top" : "";
          bars.appendChild(el("span", "name" + top, name));
          var track = el("div", "track" + top), fill = el("div", "fill");
          fill.style.width = Math.max(0, Math.min(100, 100 * p)).toFixed(2) + "%";
          fill.setAttribute("data-testid", "bar");
          fill.setAttribute("data-class", name);
          track.appendChild(fill);
          bars.appendChild(track);
          var sd = r.std ? " \u00b1" + (100 * r.std[name]).toFixed(1) : "";
          bars.appendChild(el("span", "pct" + top, pct(p) + sd));
        });
      card.appendChild(bars);
      if (r.explanation) {
        var sum = r.explanation.tokens.reduce(function (a, t) { return a + t.attribution; }, 0);
        var why = el("p", "why", "Highlights: " + r.explanation.method + " of " + r.explanation.explains +
          ". Sum " + sum.toFixed(4) + (r.explanation.blended ? "; the n-gram model's part is not shown" : "") +
          (r.explanation.truncated ? "; the text's end was cut off" : "") + ".");
        why.setAttribute("data-testid", "why");
        card.insertBefore(why, head);
      }
      resultsEl.appendChild(card);
    });
  }

  async function classify() {
    var texts = textsEl.value.split(/\r?\n/).map(function (t) { return t.trim(); })
      .filter(function (t) { return t.length > 0; });
    if (!texts.length) { showError("Enter at least one text (one per line)."); return; }
    var body = { texts: texts };
    var mc = parseInt(mcEl.value, 10);
    if (mc > 0) body.mc_dropout = mc;
    if (thrEl.value !== "") body.threshold = parseFloat(thrEl.value);
    if (explainEl.checked) body.explain = true;
    var headers = { "Content-Type": "application/json" };
    if (config.auth) {
      var key = keyEl.value.trim();
      if (key) headers["Authorization"] = "Bearer " + key;
      try { sessionStorage.setItem("llmclf-api-key", key); } catch (e) { /* storage off */ }
    }
    showError("");
    button.disabled = true;
    statusEl.textContent = "Classifying " + texts.length + " text" + (texts.length > 1 ? "s" : "") + "\u2026";
    var started = performance.now();
    try {
      var response = await fetch("/v1/classify", { method: "POST", headers: headers, body: JSON.stringify(body) });
      var data = null;
      try { data = await response.json(); } catch (e) { /* not JSON */ }
      if (!response.ok) {
        var detail = data && data.detail ? data.detail : response.statusText;
        showError("Error " + response.status + ": " + detail);
        statusEl.textContent = "";
        return;
      }
      render(texts, data.results);
      statusEl.textContent = data.results.length + " classified in " +
        Math.round(performance.now() - started) + " ms";
    } catch (e) {
      showError("Could not reach the server: " + e.message);
      statusEl.textContent = "";
    } finally {
      button.disabled = false;
    }
  }

  form.addEventListener("submit", function (event) { event.preventDefault(); classify(); });
  textsEl.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); classify(); }
  });
})();

// The swarm health page: fetches /api/v1/state and renders it; refreshes itself.
// Everything a peer announces is untrusted text: it enters the document only through textContent and
// setAttribute (never parsed as markup), so a name like "<script>" is shown as those characters.
"use strict";

(function () {
  const DEFAULT_REFRESH_S = 10;

  // el("td", {class: "x", title: "y"}, "text", otherNode) — strings become text nodes.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // API times are UTC epoch seconds; the viewer sees their own local time.
  const localTime = (t) => (t === null || t === undefined ? "—" : new Date(t * 1000).toLocaleString());
  const localClock = (t) => new Date(t * 1000).toLocaleTimeString();
  const orDash = (v) => (v === null || v === undefined || v === "" ? "—" : v);
  const percent = (f) => (f === null || f === undefined ? "—" : `${(100 * f).toFixed(f === 1 || f === 0 ? 0 : 1)}%`);
  const rtt = (s) => (s === null || s === undefined ? "—" : `${(1000 * s).toFixed(1)} ms`);
  const number = (v, digits) =>
    v === null || v === undefined ? "—" : Number(v).toLocaleString(undefined, {maximumFractionDigits: digits});

  function spans(runs) {
    return runs.map(([a, b]) => (b - a === 1 ? `${a}` : `${a}–${b - 1}`)).join(", ");
  }

  function coverageMap(model) {
    const map = el("div", {class: "coverage-map", role: "list", "aria-label": `blocks of ${model.prefix}`});
    model.coverage.forEach((count, block) => {
      const level = count === 0 ? "gap" : `r${Math.min(count, 3)}`;
      map.append(
        el(
          "div",
          {
            class: `block ${level}`,
            role: "listitem",
            "data-block": block,
            "data-count": count,
            title: `block ${block}: ${count} online peer${count === 1 ? "" : "s"}`,
          },
          el("span", {class: "idx"}, block),
          el("span", {class: "count"}, count)
        )
      );
    });
    return map;
  }

  function cell(text, cls) {
    return el("td", cls ? {class: cls} : {}, orDash(text));
  }

  const PEER_COLUMNS = [
    "Peer", "Name", "Version", "State", "Blocks", "dtype / quant", "Throughput", "Cache left", "Link", "RTT", "Batch", "Queue",
    "Record expires",
  ];
  const COLUMN_HELP = {
    Batch: "sessions in the peer's last batched step, as it told the monitor's probe",
    Queue: "computations waiting in the peer's scheduler, as it told the monitor's probe",
  };

  function peerTable(model) {
    const body = el("tbody");
    for (const p of model.peers) {
      const state = el("span", {class: `state state-${p.state}`}, p.state);
      if (p.probe_error) state.setAttribute("title", p.probe_error);
      body.append(
        el(
          "tr",
          {"data-peer-id": p.peer_id, "data-state": p.state},
          el("td", {class: "mono", title: p.peer_id}, p.short_id),
          cell(p.public_name, "name"),
          cell(p.version),
          el("td", {}, state),
          cell(`${p.start}:${p.end}`, "mono"),
          cell(p.quant === "none" ? p.dtype : `${p.dtype} / ${p.quant}`),
          cell(p.throughput === null ? null : `${number(p.throughput, 1)} tok/s`, "num"),
          cell(number(p.cache_tokens_left, 0), "num"),
          cell(p.connection),
          cell(rtt(p.rtt_s), "num"),
          cell(number(p.batch_sessions, 0), "num"),
          cell(number(p.queue_length, 0), "num"),
          cell(localTime(p.expires_at))
        )
      );
    }
    const head = el("tr", {}, ...PEER_COLUMNS.map((c) => el("th", {scope: "col", title: COLUMN_HELP[c]}, c)));
    const table = el("table", {class: "peers"}, el("thead", {}, head), body);
    if (!model.peers.length) {
      body.append(el("tr", {class: "empty"}, el("td", {colspan: PEER_COLUMNS.length}, "No peer announces this model.")));
    }
    return table;
  }

  function timeline(values, title) {
    const strip = el("div", {class: "timeline"});
    values.forEach((v, i) => {
      const level = v === null ? "nodata" : v >= 1 ? "up" : v <= 0 ? "down" : "partial";
      strip.append(el("span", {class: `tick ${level}`, title: title(v, i)}));
    });
    return strip;
  }

  function historySection(model) {
    const h = model.history;
    if (!h) return null;
    const bucketStart = (i) => h.start + i * h.bucket_s;
    const coverage = timeline(
      h.coverage.map((b) => b.healthy_fraction),
      (v, i) => {
        const b = h.coverage[i];
        if (v === null) return `${localTime(bucketStart(i))}: no data`;
        return `${localTime(bucketStart(i))}: healthy ${percent(v)}, at least ${b.min_covered}/${orDash(model.num_blocks)} blocks covered`;
      }
    );
    const rows = h.peers.map((p) =>
      el(
        "tr",
        {"data-peer-id": p.peer_id},
        el("td", {class: "mono", title: p.peer_id}, p.short_id),
        cell(p.public_name, "name"),
        cell(percent(p.uptime), "num"),
        el("td", {}, timeline(p.timeline, (v, i) => `${localTime(bucketStart(i))}: ${v === null ? "no data" : `online ${percent(v)}`}`)),
        cell(localTime(p.last_seen))
      )
    );
    const table = el(
      "table",
      {class: "uptime"},
      el("thead", {}, el("tr", {}, ...["Peer", "Name", "Uptime", "Online over time", "Last seen"].map((c) => el("th", {scope: "col"}, c)))),
      el("tbody", {}, ...rows)
    );
    return el(
      "section",
      {class: "history"},
      el("h3", {}, `History since ${localTime(h.start)}`),
      el(
        "div",
        {class: "timeline-row"},
        el("span", {class: "label"}, "Model healthy"),
        el(
          "div",
          {class: "timeline-box"},
          coverage,
          el("div", {class: "axis"}, el("span", {}, localClock(h.start)), el("span", {}, localClock(h.end)))
        )
      ),
      table
    );
  }

  function modelSection(model) {
    const badge = el("span", {class: `badge ${model.healthy ? "healthy" : "unhealthy"}`}, model.healthy ? "healthy" : "unhealthy");
    const about = [model.name, model.family].filter((v) => v).join(" · ");
    const size = model.num_blocks === null ? "size unknown" : `${model.blocks_covered}/${model.num_blocks} blocks served`;
    const counts = model.peer_counts;
    const summary = `${counts.online} online · ${counts.joining} joining · ${counts.unreachable} unreachable · ${counts.offline} offline`;
    const gapText = model.gaps.length ? `Uncovered blocks: ${spans(model.gaps)}` : "Every block is served.";
    return el(
      "section",
      {class: "model", "data-prefix": model.prefix, "data-healthy": model.healthy},
      el("h2", {}, model.prefix, " ", badge),
      el("p", {class: "about"}, [about, size, summary].filter((v) => v).join(" — ")),
      el("h3", {}, "Block coverage"),
      model.num_blocks === null ? el("p", {class: "gaps"}, "No peer tells this model's size yet.") : coverageMap(model),
      el("p", {class: model.gaps.length ? "gaps bad" : "gaps"}, gapText),
      el("h3", {}, "Peers"),
      el("div", {class: "scroll"}, peerTable(model)),
      model.hidden_peers ? el("p", {class: "note"}, `${model.hidden_peers} more peers not listed.`) : null,
      historySection(model)
    );
  }

  function render(state) {
    const models = document.getElementById("models");
    const sections = state.models.map(modelSection);
    if (!sections.length) sections.push(el("p", {class: "empty"}, "No model found in the swarm yet."));
    models.replaceChildren(...sections);
    const healthy = state.models.filter((m) => m.healthy).length;
    const online = state.models.reduce((n, m) => n + m.peer_counts.online, 0);
    const status = document.getElementById("status");
    status.className = state.scrape.error ? "status bad" : "status";
    status.textContent =
      `${state.models.length} model(s), ${healthy} healthy, ${online} peer(s) online · last look ` +
      `${localTime(state.scrape.started_at)} (took ${state.scrape.duration_s.toFixed(2)} s)` +
      (state.scrape.error ? ` · last look failed: ${state.scrape.error}` : "");
    status.dataset.startedAt = String(state.scrape.started_at);
    document.body.dataset.generatedAt = String(state.generated_at);
  }

  let refreshSeconds = DEFAULT_REFRESH_S;

  async function refresh() {
    try {
      const response = await fetch("/api/v1/state", {cache: "no-store"});
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const state = await response.json();
      refreshSeconds = state.settings.page_refresh_s || DEFAULT_REFRESH_S;
      render(state);
    } catch (e) {
      const status = document.getElementById("status");
      status.className = "status bad";
      status.textContent = `Cannot read the monitor's state (${e.message}); retrying.`;
    } finally {
      setTimeout(refresh, refreshSeconds * 1000);
    }
  }

  document.addEventListener("DOMContentLoaded", refresh);
})();

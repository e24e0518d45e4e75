// The usage chart: stacked bars of accepted and rejected requests per hour or day, as SVG built
// in the DOM (no inline style: colours come from app.css classes).
//
// Input: buckets shaped like `GET /keys/{id}/usage` answers, `{start, accepted, rejected}`;
// a bucket without `rejected` counts every other numeric member (`rate_limited`,
// `insufficient_scope`, `expired`, `revoked`, ...) as rejected.

import { h, svg } from "./dom.js";

/** Accepted and rejected counts of one bucket. */
export function counts(bucket) {
  const accepted = Number(bucket.accepted) || 0;
  let rejected = 0;
  if (typeof bucket.rejected === "number") {
    rejected = bucket.rejected;
  } else {
    for (const [name, value] of Object.entries(bucket)) {
      if (name !== "accepted" && name !== "total" && typeof value === "number") rejected += value;
    }
  }
  return { accepted, rejected };
}

/** Totals over every bucket. */
export function summarize(buckets) {
  return buckets.reduce((sum, bucket) => {
    const { accepted, rejected } = counts(bucket);
    return { accepted: sum.accepted + accepted, rejected: sum.rejected + rejected };
  }, { accepted: 0, rejected: 0 });
}

function label(start, granularity) {
  const date = new Date(start);
  if (Number.isNaN(date.getTime())) return String(start);
  const pad = (n) => String(n).padStart(2, "0");
  const day = `${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
  return granularity === "day" ? day : `${day} ${pad(date.getHours())}:00`;
}

/** A round number at or above `max`, for the axis. */
function niceCeiling(max) {
  if (max <= 4) return 4;
  const magnitude = 10 ** Math.floor(Math.log10(max));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (step * magnitude >= max) return step * magnitude;
  }
  return 10 * magnitude;
}

/**
 * A `<figure>` holding the chart, its legend and totals. `granularity` is "hour" or "day".
 */
export function usageChart(buckets, { granularity = "hour", title = "Requests" } = {}) {
  const data = buckets.map((bucket) => ({ start: bucket.start, ...counts(bucket) }));
  const totals = summarize(buckets);
  const width = 720;
  const height = 240;
  const pad = { top: 12, right: 12, bottom: 34, left: 44 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const top = niceCeiling(Math.max(0, ...data.map((d) => d.accepted + d.rejected)));
  const y = (value) => pad.top + plotH - (value / top) * plotH;
  const slot = data.length ? plotW / data.length : plotW;
  const barW = Math.max(1, Math.min(28, slot * 0.7));

  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height}`,
    class: "chart",
    role: "img",
    "aria-label": `${title}: ${totals.accepted} accepted and ${totals.rejected} rejected over ${data.length} ${granularity === "day" ? "days" : "hours"}`,
    preserveAspectRatio: "xMidYMid meet",
  });
  for (let i = 0; i <= 4; i += 1) {
    const value = (top / 4) * i;
    chart.append(
      svg("line", { class: "grid", x1: pad.left, x2: width - pad.right, y1: y(value), y2: y(value) }),
      svg("text", { class: "axis", x: pad.left - 6, y: y(value) + 4, "text-anchor": "end" }, Number.isInteger(value) ? value : value.toFixed(1)),
    );
  }
  const every = Math.max(1, Math.ceil(data.length / 8));
  data.forEach((d, i) => {
    const x = pad.left + slot * i + (slot - barW) / 2;
    const bar = svg("g", { class: "bar", "data-start": d.start },
      svg("title", {}, `${label(d.start, granularity)}: ${d.accepted} accepted, ${d.rejected} rejected`));
    if (d.accepted > 0) {
      bar.append(svg("rect", { class: "accepted", x, width: barW, y: y(d.accepted), height: y(0) - y(d.accepted) }));
    }
    if (d.rejected > 0) {
      const base = d.accepted + d.rejected;
      bar.append(svg("rect", { class: "rejected", x, width: barW, y: y(base), height: y(d.accepted) - y(base) }));
    }
    chart.append(bar);
    if (i % every === 0) {
      chart.append(svg("text", { class: "axis", x: x + barW / 2, y: height - pad.bottom + 16, "text-anchor": "middle" }, label(d.start, granularity)));
    }
  });
  chart.append(svg("line", { class: "baseline", x1: pad.left, x2: width - pad.right, y1: y(0), y2: y(0) }));

  return h("figure", { class: "usage" },
    chart,
    h("figcaption", {},
      h("span", { class: "legend accepted" }, `${totals.accepted} accepted`),
      h("span", { class: "legend rejected" }, `${totals.rejected} rejected`),
      data.length === 0 ? h("span", { class: "muted" }, "no requests in this period") : null));
}

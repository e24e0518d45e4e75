// One key's page: details, actions (edit, rotate, disable/enable, revoke, delete), usage chart
// and audit trail.

import { h, field, replace, time, stateBadge } from "./dom.js";
import { query } from "./api.js";
import { usageChart } from "./chart.js";
import { scopeList, parseScopes, newKeyPanel, expiryControls, expiryMembers, creditsValue } from "./keys.js";

// The audit log and usage analytics come with a later keywarden (`GET /audit`,
// `GET /keys/{id}/usage`); until the server has them, their sections say so.
const AUDIT_KEY_PARAM = "key_id";

function detail(term, value) {
  return [h("dt", {}, term), h("dd", {}, value)];
}

function text(value) {
  return value === null || value === undefined || value === "" ? h("span", { class: "muted" }, "—") : String(value);
}

function unlimited(key) {
  return key.credits === null || key.credits === undefined;
}

function details(key) {
  const metadata = key.metadata && Object.keys(key.metadata).length
    ? h("pre", { class: "json" }, JSON.stringify(key.metadata, null, 2))
    : h("span", { class: "muted" }, "none");
  return h("dl", { class: "details" },
    detail("Id", h("code", {}, key.id)),
    detail("Key", h("code", { class: "prefix" }, `${key.display_start}…`)),
    detail("Description", text(key.description)),
    detail("Collection", key.collection),
    detail("Subject", key.subject),
    detail("Owner kind", key.owner_kind),
    detail("Environment", key.environment),
    detail("Scopes", scopeList(key.scopes)),
    detail("Read-only", key.read_only ? "yes" : "no"),
    detail("Rate limit", text(key.rate_limit || "server default")),
    detail("Allowed IPs", text((key.allowed_ips || []).join(", ") || "any address")),
    detail("Expires", time(key.expires_at, "never")),
    detail("Credits", unlimited(key) ? "unlimited" : h("span", { title: "Left in the store; instances serving the key may hold a few more, leased." }, String(key.credits))),
    detail("Refill", key.refill
      ? [key.refill, h("span", { class: "muted small" }, ` · the balance is set to ${key.refill.split("/")[0]} each period`)]
      : "none"),
    detail("Last used", time(key.last_used_at, "never")),
    detail("Uses", String(key.use_count)),
    detail("Created", time(key.created_at)),
    detail("Updated", time(key.updated_at)),
    key.revoked_at ? detail("Revoked", time(key.revoked_at)) : null,
    key.rotated_from ? detail("Rotated from", h("a", { href: `#/keys/${key.rotated_from}` }, h("code", {}, key.rotated_from))) : null,
    detail("Metadata", metadata));
}

export async function keyScreen(context, id) {
  const { api, main } = context;
  const key = await api.get(`keys/${id}`);
  const status = h("div", { "aria-live": "polite", id: "key-status" });
  const usage = h("section", { class: "card", "aria-labelledby": "usage-heading", id: "usage" });
  const audit = h("section", { class: "card", "aria-labelledby": "audit-heading", id: "audit" });

  replace(main,
    h("p", { class: "crumbs" }, h("a", { href: "#/" }, "← All keys")),
    h("div", { class: "page-head" },
      h("h1", { class: "key-title" }, key.name, " ", stateBadge(key.state)),
      actions(context, key, status)),
    status,
    h("section", { class: "card", "aria-label": "Details" }, details(key)),
    h("div", { class: "two" }, usage, audit));
  loadUsage(api, key, usage, "hour");
  loadAudit(api, key, audit);
}

function actions(context, key, status) {
  const { api, main, navigate, confirmDialog, errorPanel, toast } = context;
  const run = async (work, done) => {
    replace(status);
    try {
      const result = await work();
      done(result);
    } catch (error) {
      replace(status, errorPanel(error));
    }
  };
  const button = (label, handler, extra = "ghost") => h("button", { type: "button", class: ["button", extra], on: { click: handler } }, label);
  const live = key.state !== "revoked";
  return h("div", { class: "key-actions", role: "group", "aria-label": "Actions" },
    button("Edit", () => editDialog(context, key, status)),
    live && !key.disabled ? button("Rotate", async () => {
      const grace = h("select", { name: "grace" },
        [["0s", "none: stop it now"], ["1h", "1 hour"], ["24h", "24 hours"], ["7d", "7 days"]]
          .map(([value, label]) => h("option", { value, selected: value === "24h" }, label)));
      const form = await confirmDialog({
        title: `Rotate “${key.name}”?`,
        body: [h("p", {}, "A new key with the same settings replaces this one. The old key keeps working for the grace period, so clients can switch over."),
          field("Grace period", grace)],
        ok: "Rotate",
      });
      if (!form) return;
      run(() => api.post(`keys/${key.id}/rotate`, { grace: form.get("grace") }), (created) => {
        replace(main, newKeyPanel(created, {
          heading: "Key rotated",
          note: "The new key has its own page; the old one ends after the grace period.",
          done: () => context.navigate(`#/keys/${created.id}`),
        }));
      });
    }) : null,
    live && key.disabled ? button("Enable", async () => {
      if (!await confirmDialog({ title: `Enable “${key.name}”?`, body: h("p", {}, "The key will authenticate again."), ok: "Enable" })) return;
      run(() => api.patch(`keys/${key.id}`, { disabled: false }), () => { toast("Key enabled"); navigate(`#/keys/${key.id}`); });
    }) : null,
    live && !key.disabled ? button("Disable", async () => {
      if (!await confirmDialog({ title: `Disable “${key.name}”?`, body: h("p", {}, "Requests with this key are refused until it is enabled again."), ok: "Disable", danger: true })) return;
      run(() => api.patch(`keys/${key.id}`, { disabled: true }), () => { toast("Key disabled"); navigate(`#/keys/${key.id}`); });
    }) : null,
    live ? button("Revoke", async () => {
      if (!await confirmDialog({ title: `Revoke “${key.name}”?`, body: h("p", {}, "Revoking is for good: the key is refused from now on, on every instance, and cannot be enabled again."), ok: "Revoke", danger: true })) return;
      run(() => api.post(`keys/${key.id}/revoke`), () => { toast("Key revoked"); navigate(`#/keys/${key.id}`); });
    }, "danger-ghost") : null,
    button("Delete", async () => {
      if (!await confirmDialog({ title: `Delete “${key.name}”?`, body: h("p", {}, "The key and its record are deleted; it is refused from now on. This cannot be undone."), ok: "Delete", danger: true })) return;
      run(() => api.del(`keys/${key.id}`), () => { toast("Key deleted"); navigate("#/"); });
    }, "danger-ghost"));
}

const EDIT_EXPIRY = [
  ["", "Unchanged"],
  ["unlimited", "Never"],
  ["7d", "7 days from now"],
  ["30d", "30 days from now"],
  ["90d", "90 days from now"],
  ["duration", "Another duration from now…"],
  ["date", "On a date…"],
];

const UNITS = { s: 1, m: 60, h: 3600, d: 86400 };

/** `expires_at` for a lifetime from now such as `30d` (the PATCH takes instants only). */
function expiresAtIn(text) {
  if (text === "unlimited") return { expires_at: null };
  const match = /^(\d+)\s*([smhd])$/.exec(text);
  if (!match) return { expires_at: text };
  return { expires_at: new Date(Date.now() + Number(match[1]) * UNITS[match[2]] * 1000).toISOString() };
}

async function editDialog(context, key, status) {
  const { api, confirmDialog, errorPanel, toast, navigate } = context;
  const name = h("input", { name: "name", value: key.name, required: true, autocomplete: "off" });
  const description = h("textarea", { name: "description", rows: "2", value: key.description || "" });
  const scopes = h("input", { name: "scopes", value: key.scopes.join(", "), autocomplete: "off" });
  const rateLimit = h("input", { name: "rate_limit", value: key.rate_limit || "", placeholder: "server default", autocomplete: "off" });
  const currentIps = key.allowed_ips || [];
  const allowedIps = h("input", { name: "allowed_ips", value: currentIps.join(", "), placeholder: "any address", autocomplete: "off" });
  const credits = h("input", { name: "credits", type: "number", min: "0", step: "1", inputmode: "numeric", placeholder: unlimited(key) ? "unchanged (unlimited)" : `unchanged (${key.credits} left)`, autocomplete: "off" });
  const refill = h("input", { name: "refill", value: key.refill || "", placeholder: "none, e.g. 1000/day", autocomplete: "off" });
  const noLimit = h("input", { type: "checkbox", name: "unlimited", id: "credits-unlimited", checked: unlimited(key) });
  // Unlimited credits have no refill (the API drops it): the two fields wait for a limit.
  const syncCredits = () => {
    credits.disabled = noLimit.checked;
    refill.disabled = noLimit.checked;
    if (noLimit.checked) credits.value = "";
  };
  noLimit.addEventListener("change", syncCredits);
  syncCredits();
  const expiry = expiryControls(EDIT_EXPIRY);
  const form = await confirmDialog({
    title: `Edit “${key.name}”`,
    body: [field("Name", name), field("Description", description), field("Scopes", scopes, "Separated by commas or spaces."),
      ...expiry.nodes, field("Rate limit", rateLimit, "Empty: the server's default."),
      field("Allowed IPs", allowedIps, "Networks (CIDR) or addresses, separated by commas or spaces. Empty: any address."),
      h("div", { class: "check" }, noLimit, h("label", { for: "credits-unlimited" }, "Unlimited credits (no refill)")),
      field("Credits", credits, "A number sets the balance and restarts the refill schedule from now. Empty: unchanged."),
      field("Refill", refill, "Amount/period; a period of s, min, h, day, week or month (30 days). Each period the balance is set to the amount, not added to. Empty: none.")],
    ok: "Save",
  });
  if (!form) return;
  const patch = {};
  if (name.value.trim() !== key.name) patch.name = name.value.trim();
  const newDescription = description.value.trim();
  if (newDescription !== (key.description || "")) patch.description = newDescription || null;
  const newScopes = parseScopes(scopes.value);
  if (newScopes.join(" ") !== key.scopes.join(" ")) patch.scopes = newScopes;
  if (rateLimit.value.trim() !== (key.rate_limit || "")) patch.rate_limit = rateLimit.value.trim() || null;
  const newIps = parseScopes(allowedIps.value);
  if (newIps.join(" ") !== currentIps.join(" ")) patch.allowed_ips = newIps;
  Object.assign(patch, expiryMembers(expiry, expiresAtIn));
  if (noLimit.checked) {
    if (!unlimited(key)) patch.credits = null;
  } else {
    if (credits.validity.badInput) {
      // The browser keeps text it cannot read as a number to itself (the value is "").
      return replace(status, errorPanel({ title: "Credits is not a number", detail: "Enter a whole number such as 1000, or leave it empty to keep the balance." }));
    }
    if (credits.value.trim()) patch.credits = creditsValue(credits.value.trim());
    const newRefill = refill.value.trim();
    if (newRefill !== (key.refill || "")) patch.refill = newRefill || null;
  }
  if (Object.keys(patch).length === 0) return toast("Nothing changed");
  replace(status);
  try {
    await api.patch(`keys/${key.id}`, patch);
    toast("Key saved");
    navigate(`#/keys/${key.id}`);
  } catch (error) {
    replace(status, errorPanel(error));
  }
}

function unavailable(sentence) {
  return h("p", { class: "placeholder" }, sentence);
}

async function loadUsage(api, key, section, granularity) {
  const heading = h("h2", { id: "usage-heading" }, "Usage");
  const toggle = h("div", { class: "segmented", role: "group", "aria-label": "Bucket size" },
    ["hour", "day"].map((g) => h("button", {
      type: "button", class: ["button", "small", g === granularity ? null : "ghost"], "aria-pressed": String(g === granularity),
      on: { click: () => loadUsage(api, key, section, g) },
    }, g === "hour" ? "Hourly" : "Daily")));
  const body = h("div", { class: "usage-body" }, h("p", { class: "muted" }, "Loading…"));
  replace(section, h("div", { class: "section-head" }, heading, toggle), body);
  try {
    const data = await api.get(`keys/${key.id}/usage${query({ granularity })}`);
    const buckets = Array.isArray(data?.buckets) ? data.buckets : [];
    replace(body, usageChart(buckets, { granularity, title: `Requests with “${key.name}”` }));
  } catch (error) {
    if (error.unsupported) {
      toggle.hidden = true;
      replace(body, unavailable("Usage analytics are not available in this version of keywarden."),
        h("p", { class: "muted small" }, `What is known: ${key.use_count} use${key.use_count === 1 ? "" : "s"}, last `,
          key.last_used_at ? time(key.last_used_at) : "never", "."));
    } else {
      replace(body, h("div", { class: "alert error", role: "alert" }, h("strong", { class: "alert-title" }, error.title || "Error"), error.detail ? h("p", {}, error.detail) : null));
    }
  }
}

function describeActor(actor) {
  if (actor === null || actor === undefined) return "—";
  if (typeof actor !== "object") return String(actor);
  return [actor.kind, actor.subject ?? actor.name, actor.id].filter(Boolean).join(" · ") || JSON.stringify(actor);
}

async function loadAudit(api, key, section) {
  replace(section, h("h2", { id: "audit-heading" }, "Audit trail"), h("p", { class: "muted" }, "Loading…"));
  try {
    const data = await api.get(`audit${query({ [AUDIT_KEY_PARAM]: key.id, limit: 50 })}`);
    const events = Array.isArray(data?.items) ? data.items : Array.isArray(data?.events) ? data.events : [];
    const list = events.length
      ? h("ol", { class: "audit" }, events.map((event) => h("li", {},
        h("div", {}, h("strong", {}, String(event.action ?? "change")), " ", h("span", { class: "muted small" }, "by "), describeActor(event.actor)),
        h("div", { class: "muted small" }, time(event.at ?? event.time ?? event.timestamp)),
        event.changes ? h("pre", { class: "json" }, JSON.stringify(event.changes, null, 2)) : null)))
      : h("p", { class: "muted" }, "No events for this key.");
    replace(section, h("h2", { id: "audit-heading" }, "Audit trail"), list);
  } catch (error) {
    replace(section, h("h2", { id: "audit-heading" }, "Audit trail"),
      error.unsupported
        ? unavailable("The audit log is not available in this version of keywarden.")
        : h("div", { class: "alert error", role: "alert" }, h("strong", { class: "alert-title" }, error.title || "Error"), error.detail ? h("p", {}, error.detail) : null));
  }
}

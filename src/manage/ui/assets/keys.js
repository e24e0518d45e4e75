// The key list (filters, pages) and the create form; `newKeyPanel` shows a plaintext key once.

import { query, API_BASE } from "./api.js";
import { h, field, replace, time, stateBadge } from "./dom.js";

const STATES = ["active", "expired", "revoked", "disabled"];
const FILTERS = ["collection", "subject", "environment", "state"];
const PAGE_SIZES = ["25", "50", "100"];

/** Scopes from free text: split on commas and whitespace. */
export function parseScopes(text) {
  return text.split(/[\s,]+/).filter(Boolean);
}

export function scopeList(scopes) {
  if (!scopes || scopes.length === 0) return h("span", { class: "muted" }, "none");
  return h("ul", { class: "chips" }, scopes.map((scope) => h("li", { class: "chip" }, scope)));
}

/** Credits left (the API's `null`: unlimited), and the refill under them. */
function creditsCell(key) {
  if (key.credits === null || key.credits === undefined) {
    // "∞" keeps the column narrow beside eight others; the word is there for screen readers.
    return h("span", { class: "muted", title: "unlimited" }, h("span", { "aria-hidden": "true" }, "∞"), h("span", { class: "visually-hidden" }, "unlimited"));
  }
  return [String(key.credits), key.refill ? h("div", { class: "muted small" }, key.refill) : null];
}

/**
 * The `credits` member from a credits input: a number when the text is one, else the text
 * itself, so the API judges it and names the field (as it does for every other member).
 */
export function creditsValue(text) {
  return /^-?\d+$/.test(text) ? Number(text) : text;
}

function owner(key) {
  return h("span", { class: "owner" }, h("span", {}, key.subject),
    h("span", { class: "muted small" }, ` ${key.collection} · ${key.owner_kind}`));
}

export async function listScreen({ api, main, params, navigate }) {
  const filters = Object.fromEntries(FILTERS.map((name) => [name, params.get(name) || ""]));
  const limit = PAGE_SIZES.includes(params.get("limit")) ? params.get("limit") : "25";
  const after = params.get("after") || "";
  // The cursors of the pages before this one, so "Previous" can go back.
  const trail = (params.get("trail") || "").split(",").filter(Boolean);
  const page = await api.get(`keys${query({ ...filters, limit, after })}`);

  const input = (name, placeholder) => h("input", { name, value: filters[name], placeholder, autocomplete: "off" });
  const state = h("select", { name: "state" },
    h("option", { value: "" }, "any"),
    STATES.map((s) => h("option", { value: s, selected: s === filters.state }, s)));
  const size = h("select", { name: "limit" }, PAGE_SIZES.map((n) => h("option", { value: n, selected: n === limit }, n)));
  const form = h("form", { class: "filters", role: "search", "aria-label": "Filter keys", on: {
    submit: (event) => {
      event.preventDefault();
      const data = new FormData(event.target);
      const next = Object.fromEntries([...FILTERS, "limit"].map((n) => [n, String(data.get(n) || "").trim()]));
      navigate(`#/${query(next)}`);
    },
  } },
  field("Collection", input("collection", "any")),
  field("Subject", input("subject", "any")),
  field("Environment", input("environment", "any")),
  field("State", state),
  field("Per page", size),
  h("div", { class: "filter-actions" },
    h("button", { type: "submit", class: "button" }, "Filter"),
    h("a", { class: "button ghost", href: "#/" }, "Reset")));

  const pageHash = (cursor, nextTrail) => `#/${query({ ...filters, limit, after: cursor, trail: nextTrail.join(",") })}`;
  const rows = page.items.map((key) => h("tr", {},
    h("td", { "data-label": "Name" },
      h("a", { href: `#/keys/${key.id}`, class: "key-name" }, key.name),
      key.description ? h("div", { class: "muted small clamp" }, key.description) : null),
    h("td", { "data-label": "Key" }, h("code", { class: "prefix" }, `${key.display_start}…`)),
    h("td", { "data-label": "Owner" }, owner(key)),
    h("td", { "data-label": "Scopes" }, scopeList(key.scopes)),
    h("td", { "data-label": "State" }, stateBadge(key.state)),
    h("td", { "data-label": "Expires" }, time(key.expires_at, "never")),
    h("td", { "data-label": "Last used" }, time(key.last_used_at, "never")),
    h("td", { "data-label": "Uses", class: "num" }, String(key.use_count)),
    h("td", { "data-label": "Credits", class: "num" }, creditsCell(key))));
  const table = page.items.length
    ? h("table", { class: "keys" },
      h("caption", { class: "visually-hidden" }, "API keys"),
      h("thead", {}, h("tr", {}, ["Name", "Key", "Owner", "Scopes", "State", "Expires", "Last used", "Uses", "Credits"]
        .map((name) => h("th", { scope: "col", class: name === "Uses" || name === "Credits" ? "num" : null }, name)))),
      h("tbody", {}, rows))
    : h("p", { class: "empty" }, Object.values(filters).some(Boolean) ? "No key matches these filters." : "No keys yet. Create the first one.");
  const pager = h("nav", { class: "pager", "aria-label": "Pages" },
    trail.length || after
      ? h("a", { class: "button ghost", href: pageHash(trail[trail.length - 1] === "-" ? "" : trail[trail.length - 1] || "", trail.slice(0, -1)), rel: "prev" }, "← Previous")
      : h("span", {}),
    h("span", { class: "muted small" }, `${page.items.length} key${page.items.length === 1 ? "" : "s"} on this page`),
    page.next_cursor
      ? h("a", { class: "button ghost", href: pageHash(page.next_cursor, [...trail, after || "-"]), rel: "next" }, "Next →")
      : h("span", {}));

  replace(main,
    h("div", { class: "page-head" },
      h("h1", {}, "API keys"),
      h("a", { class: "button", href: "#/new" }, "+ New key")),
    form,
    h("div", { class: "card flush" }, table),
    pager);
}

const EXPIRY_PRESETS = [
  ["", "Default (never; a keys:self caller's own expiry)"],
  ["7d", "7 days"],
  ["30d", "30 days"],
  ["90d", "90 days"],
  ["unlimited", "Never"],
  ["duration", "Another duration…"],
  ["date", "On a date…"],
];

/** The expiry controls, shared by the create form (`expires_in`) and the edit dialog. */
function expiryControls(presets) {
  const select = h("select", { name: "expiry" }, presets.map(([value, text]) => h("option", { value }, text)));
  const duration = h("input", { name: "expires_in", placeholder: "e.g. 12h, 14d", autocomplete: "off" });
  const date = h("input", { name: "expires_at", type: "datetime-local" });
  const durationField = field("Duration", duration, "A number and a unit: s, m, h or d.");
  const dateField = field("Expires at (your local time)", date);
  const sync = () => {
    durationField.hidden = select.value !== "duration";
    dateField.hidden = select.value !== "date";
  };
  select.addEventListener("change", sync);
  sync();
  return { select, duration, date, nodes: [field("Expires", select), durationField, dateField] };
}

/** The expiry members of a request from the controls' values. */
export function expiryMembers(expiry, inFrom) {
  const { select, duration, date } = expiry;
  if (select.value === "date") return date.value ? { expires_at: new Date(date.value).toISOString() } : { expires_at: "" };
  if (select.value === "duration") return inFrom(duration.value.trim());
  if (select.value) return inFrom(select.value);
  return {};
}

export { expiryControls };

export async function createScreen({ api, main, navigate, errorPanel }) {
  const name = h("input", { name: "name", required: true, autocomplete: "off", maxlength: "200" });
  const description = h("textarea", { name: "description", rows: "2" });
  const collection = h("input", { name: "collection", placeholder: "yours", autocomplete: "off" });
  const subject = h("input", { name: "subject", placeholder: "yours", autocomplete: "off" });
  const ownerKind = h("select", { name: "owner_kind" },
    h("option", { value: "" }, "Default (yours)"),
    ["user", "team", "service"].map((k) => h("option", { value: k }, k)));
  const environment = h("input", { name: "environment", placeholder: "yours, e.g. live", autocomplete: "off" });
  const scopes = h("input", { name: "scopes", placeholder: "e.g. read:orders, write:orders", autocomplete: "off" });
  const readOnly = h("input", { type: "checkbox", name: "read_only", id: "read-only" });
  const rateLimit = h("input", { name: "rate_limit", placeholder: "e.g. 100/min,burst=20", autocomplete: "off" });
  const allowedIps = h("input", { name: "allowed_ips", placeholder: "e.g. 10.0.0.0/8, 2001:db8::/32", autocomplete: "off" });
  const credits = h("input", { name: "credits", type: "number", min: "0", step: "1", inputmode: "numeric", placeholder: "unlimited", autocomplete: "off" });
  const refill = h("input", { name: "refill", placeholder: "e.g. 1000/day", autocomplete: "off" });
  const metadata = h("textarea", { name: "metadata", rows: "3", class: "mono", placeholder: "{\"team\": \"billing\"}", spellcheck: "false" });
  const expiry = expiryControls(EXPIRY_PRESETS);
  const status = h("div", { "aria-live": "polite" });
  const submit = h("button", { type: "submit", class: "button" }, "Create key");

  const form = h("form", { class: "card form", id: "create-key", novalidate: true, on: {
    submit: async (event) => {
      event.preventDefault();
      replace(status);
      markInvalid(form, []);
      const body = { name: name.value.trim() };
      const text = (input, member) => { if (input.value.trim()) body[member] = input.value.trim(); };
      text(description, "description");
      text(collection, "collection");
      text(subject, "subject");
      text(ownerKind, "owner_kind");
      text(environment, "environment");
      text(rateLimit, "rate_limit");
      text(refill, "refill");
      if (credits.validity.badInput) {
        // The browser keeps text it cannot read as a number to itself (the value is "").
        replace(status, errorPanel({ title: "Credits is not a number", detail: "Enter a whole number such as 1000, or leave it empty for unlimited.", errors: [] }));
        credits.setAttribute("aria-invalid", "true");
        credits.focus();
        return;
      }
      if (credits.value.trim()) body.credits = creditsValue(credits.value.trim());
      const scopeList = parseScopes(scopes.value);
      if (scopeList.length) body.scopes = scopeList;
      const networks = parseScopes(allowedIps.value);
      if (networks.length) body.allowed_ips = networks;
      if (readOnly.checked) body.read_only = true;
      Object.assign(body, expiryMembers(expiry, (value) => ({ expires_in: value })));
      if (metadata.value.trim()) {
        try {
          body.metadata = JSON.parse(metadata.value);
        } catch (error) {
          replace(status, errorPanel({ title: "Metadata is not valid JSON", detail: error.message, errors: [] }));
          metadata.focus();
          return;
        }
      }
      submit.disabled = true;
      try {
        const created = await api.post("keys", body);
        replace(main, newKeyPanel(created, {
          heading: "Key created",
          done: () => navigate(`#/keys/${created.id}`),
        }));
      } catch (error) {
        replace(status, errorPanel(error));
        markInvalid(form, error.errors || []);
        submit.disabled = false;
        status.scrollIntoView({ block: "nearest" });
      }
    },
  } },
  h("div", { class: "grid" },
    h("fieldset", {},
      h("legend", {}, "Key"),
      field("Name", name, "A label for people, e.g. “ci deploys”. Required."),
      field("Description", description),
      field("Scopes", scopes, "Separated by commas or spaces. None: the key authenticates but holds no scope."),
      h("div", { class: "check" }, readOnly, h("label", { for: "read-only" }, "Read-only (GET, HEAD, OPTIONS only)")),
      ...expiry.nodes,
      field("Rate limit", rateLimit, "Leave empty for the server's default."),
      field("Allowed IPs", allowedIps, "Networks (CIDR) or addresses, separated by commas or spaces. Empty: any address.")),
    h("div", {},
      h("fieldset", {},
        h("legend", {}, "Owner"),
        field("Collection", collection, "Leave empty for your own."),
        field("Subject", subject, "The owner's id in the collection."),
        field("Owner kind", ownerKind),
        field("Environment", environment, "The key's prefix ends with it: kw_<environment>_."),
        field("Metadata (JSON object)", metadata)),
      h("fieldset", {},
        h("legend", {}, "Budget"),
        field("Credits", credits, "How many requests the key may make; each costs 1 (or its route's cost). At 0 it is refused. Empty: unlimited."),
        field("Refill", refill, "Amount/period; a period of s, min, h, day, week or month (30 days). Each period the balance is set to the amount, not added to. Without credits, the key starts with the amount. Empty: no refill.")))),
  status,
  h("div", { class: "actions" }, h("a", { href: "#/", class: "button ghost" }, "Cancel"), submit));

  replace(main, h("div", { class: "page-head" }, h("h1", {}, "New key")), form);
  name.focus();
}

/** Marks the controls the API named invalid (`aria-invalid`), and only those. */
function markInvalid(form, errors) {
  const named = new Set(errors.map((e) => e.field));
  if (named.has("expires_in") || named.has("expires_at")) named.add("expiry");
  for (const control of form.elements) {
    if (control.name && named.has(control.name)) control.setAttribute("aria-invalid", "true");
    else control.removeAttribute("aria-invalid");
  }
}

function shellQuote(text) {
  return `'${String(text).replaceAll("'", "'\\''")}'`;
}

/** The three header forms the layer accepts, as curl lines against `url`. */
export function curlLines(key, collection, url) {
  return [
    `curl -H ${shellQuote(`Authorization: ${collection} API-Key ${key}`)} ${shellQuote(url)}`,
    `curl -H ${shellQuote(`Authorization: Bearer ${key}`)} ${shellQuote(url)}`,
    `curl -H ${shellQuote(`X-Api-Key: ${key}`)} ${shellQuote(url)}`,
  ];
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Select and copy";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 2000);
}

/**
 * A new key's plaintext, shown once: it lives only in this panel's DOM, so it is gone after a
 * reload or when the operator leaves the screen.
 */
export function newKeyPanel(created, { heading, done, note }) {
  const keyField = h("input", { readonly: true, value: created.key, class: "mono secret", id: "new-key", "aria-label": "The new key", spellcheck: "false" });
  keyField.addEventListener("focus", () => keyField.select());
  const copyButton = h("button", { type: "button", class: "button", id: "copy-key" }, "Copy");
  copyButton.addEventListener("click", () => copy(created.key, copyButton));
  const url = h("input", { value: new URL("/whoami", API_BASE).href, id: "try-url", autocomplete: "off", class: "mono" });
  const curl = h("pre", { class: "curl", id: "curl-lines", tabindex: "0" });
  const render = () => replace(curl, curlLines(created.key, created.collection, url.value.trim()).join("\n"));
  url.addEventListener("input", render);
  render();
  const copyCurl = h("button", { type: "button", class: "button ghost small" }, "Copy");
  copyCurl.addEventListener("click", () => copy(curl.textContent, copyCurl));
  const doneButton = h("button", { type: "button", class: "button", id: "done" }, "I have stored it — done");
  doneButton.addEventListener("click", done);
  const panel = h("section", { class: "card new-key", "aria-labelledby": "new-key-heading" },
    h("h1", { id: "new-key-heading" }, heading),
    h("div", { class: "alert warning", role: "alert" },
      h("strong", { class: "alert-title" }, "Copy this key now. It will not be shown again."),
      h("p", {}, "keywarden keeps only a digest of it: nobody can read it back, and reloading this page makes it disappear.")),
    note ? h("p", {}, note) : null,
    h("div", { class: "key-box" }, keyField, copyButton),
    h("h2", {}, "Try it"),
    field("URL", url, "Any route behind the key layer; the demo server answers /whoami."),
    h("div", { class: "curl-head" }, h("span", { class: "muted small" }, "The three header forms the layer accepts"), copyCurl),
    curl,
    h("div", { class: "actions" }, doneButton));
  setTimeout(() => keyField.focus(), 0);
  return panel;
}

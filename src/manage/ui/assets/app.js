// The admin UI: sign-in, the hash router and what every screen shares (errors, the confirm
// dialog, the toast). The key lives in `session.key` (memory) and, only when the operator asks,
// in this tab's sessionStorage; never in a cookie or in localStorage (no page script touches either).

import { createApi, ApiError } from "./api.js";
import { h, field, replace } from "./dom.js";
import { listScreen, createScreen } from "./keys.js";
import { keyScreen } from "./key.js";

const STORED = "keywarden.admin-key";

const session = {
  key: sessionStorage.getItem(STORED) || "",
  set(key, remember) {
    this.key = key;
    if (remember) sessionStorage.setItem(STORED, key);
    else sessionStorage.removeItem(STORED);
  },
  clear() {
    this.key = "";
    sessionStorage.removeItem(STORED);
  },
  /** The part of the key that is safe to show: its prefix and first characters. */
  label() {
    const match = /^([a-z][a-z0-9]*(?:_[a-z0-9]+)*_)(.{4})/.exec(this.key);
    return match ? `${match[1]}${match[2]}…` : "a pasted key";
  },
};

export const api = createApi(() => session.key);
const main = document.getElementById("main");

/**
 * An error panel in the API's words: its `title`, `detail` and each invalid field. Also takes
 * a problem the page words itself (`{ title, detail }`) and any thrown error.
 */
export function errorPanel(error) {
  const problem = error instanceof ApiError ? error
    : error && !(error instanceof Error) && error.title ? new ApiError(0, error)
      : new ApiError(0, { title: "Error", detail: String(error.message || error) });
  return h("div", { class: "alert error", role: "alert" },
    h("strong", { class: "alert-title" }, problem.title),
    problem.detail ? h("p", { class: "alert-detail" }, problem.detail) : null,
    problem.errors.length > 1
      ? h("ul", {}, problem.errors.map((e) => h("li", {}, h("code", {}, e.field), `: ${e.message}`)))
      : null);
}

/** Shows a short message at the bottom of the screen. */
export function toast(message) {
  const node = document.getElementById("toast");
  replace(node, message);
  node.classList.add("shown");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => node.classList.remove("shown"), 2500);
}

/**
 * Asks for confirmation in a modal dialog (keyboard: Tab between the buttons, Escape cancels).
 * Resolves to the form's values on OK, `null` on cancel. `body` nodes may hold inputs.
 */
export function confirmDialog({ title, body, ok = "OK", danger = false }) {
  const dialog = document.getElementById("confirm");
  const okButton = document.getElementById("confirm-ok");
  replace(document.getElementById("confirm-title"), title);
  replace(document.getElementById("confirm-body"), body);
  okButton.textContent = ok;
  okButton.classList.toggle("danger", danger);
  dialog.returnValue = "cancel";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (dialog.returnValue !== "ok") return resolve(null);
      resolve(new FormData(document.getElementById("confirm-form")));
    }, { once: true });
    dialog.showModal();
    document.getElementById("confirm-cancel").focus();
  });
}

function signInScreen(problem) {
  const input = h("input", {
    type: "password", name: "key", required: true, autocomplete: "off", spellcheck: "false",
    placeholder: "kw_live_…", class: "mono",
  });
  const remember = h("input", { type: "checkbox", name: "remember", id: "remember" });
  const status = h("div", { "aria-live": "polite" }, problem ? errorPanel(problem) : null);
  const button = h("button", { type: "submit", class: "button" }, "Sign in");
  const form = h("form", { class: "card narrow", id: "sign-in", on: {
    submit: async (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      button.disabled = true;
      session.set(key, remember.checked);
      try {
        await api.get("keys?limit=1");
        route();
      } catch (error) {
        session.clear();
        replace(status, errorPanel(error));
        button.disabled = false;
        input.focus();
      }
    },
  } },
  h("h1", {}, "Sign in"),
  h("p", {}, "Paste an API key with the ", h("code", {}, "keys:admin"), " scope to manage every key, or ",
    h("code", {}, "keys:self"), " to manage your own."),
  field("API key", input),
  h("div", { class: "check" }, remember, h("label", { for: "remember" }, "Keep me signed in in this tab")),
  h("p", { class: "notice" },
    "Your key stays in this browser tab: in memory, and in this tab's sessionStorage only if you tick the box " +
    "(it is gone when the tab closes). It is never written to a cookie or localStorage, and it is sent only to " +
    "this server's management API, as ", h("code", {}, "Authorization: Bearer"), "."),
  status,
  h("div", { class: "actions" }, button));
  replace(main, form);
  input.focus();
}

function setChrome(signedIn) {
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("session").hidden = !signedIn;
  replace(document.getElementById("session-label"), signedIn ? `Signed in with ${session.label()}` : "");
  const path = location.hash.split("?")[0] || "#/";
  for (const link of document.querySelectorAll("#nav a")) {
    // A key's page belongs to the list.
    const here = link.getAttribute("href") === (path === "#/new" ? "#/new" : "#/");
    if (here) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

/** Renders the screen the hash names: `#/` (list), `#/new`, `#/keys/<id>`. */
export async function route() {
  if (!session.key) {
    setChrome(false);
    return signInScreen();
  }
  setChrome(true);
  const [path, search] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(search || "");
  const context = { api, main, params, errorPanel, toast, confirmDialog, navigate, signedOut };
  const keyMatch = /^\/keys\/([0-9a-fA-F-]{36})$/.exec(path);
  try {
    if (path === "/new") await createScreen(context);
    else if (keyMatch) await keyScreen(context, keyMatch[1]);
    else await listScreen(context);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return signedOut(error);
    replace(main, h("div", { class: "card" }, errorPanel(error)));
  }
  main.focus({ preventScroll: true });
  if (path !== route.lastPath) window.scrollTo(0, 0);
  route.lastPath = path;
}

/** The key stopped working (revoked, expired): back to the sign-in screen, saying why. */
function signedOut(error) {
  session.clear();
  setChrome(false);
  signInScreen(error);
}

export function navigate(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

document.getElementById("confirm-cancel").addEventListener("click", () => {
  document.getElementById("confirm").close("cancel");
});
document.getElementById("sign-out").addEventListener("click", () => {
  session.clear();
  location.hash = "#/";
  route();
});
window.addEventListener("hashchange", route);
route();

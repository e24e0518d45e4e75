// The management API, called with the signed-in key as `Authorization: Bearer`. The page lives
// at `<api>/ui/`, so the API is one level up: wherever an app nests the two, they stay together.

/** An error as the API words it: problem+json `title` and `detail` (and field errors). */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.code = problem.code || null;
    this.title = problem.title || `HTTP ${status}`;
    this.detail = problem.detail || "";
    this.errors = Array.isArray(problem.errors) ? problem.errors : [];
  }

  /** The route does not exist in this version of keywarden (no problem+json body). */
  get unsupported() {
    return (this.status === 404 || this.status === 405) && !this.code;
  }
}

export const API_BASE = new URL("../", window.location.href.split("#")[0]);

export function createApi(getKey) {
  async function request(method, path, body) {
    const headers = { Accept: "application/json, application/problem+json" };
    const key = getKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    const init = { method, headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(new URL(path, API_BASE), init);
    } catch (error) {
      throw new ApiError(0, { title: "Network error", detail: `the server could not be reached (${error.message})` });
    }
    if (response.status === 204) return null;
    const type = response.headers.get("Content-Type") || "";
    const data = type.includes("json") ? await response.json().catch(() => null) : null;
    if (!response.ok) {
      throw new ApiError(response.status, data && typeof data === "object" ? data : { title: `${response.status} ${response.statusText}`.trim() });
    }
    return data;
  }
  return {
    get: (path) => request("GET", path),
    post: (path, body) => request("POST", path, body),
    patch: (path, body) => request("PATCH", path, body),
    del: (path) => request("DELETE", path),
  };
}

/** A query string from the non-empty members of `params`. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(name, value);
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

"use strict";
// Shared helpers for the console's pages. Text from the API goes into the page only through
// textContent (never parsed as markup), so a "<script>" in a prompt or an event stays text.
const TF = (() => {
  const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  // The JSON API, authenticated by the console's HttpOnly cookie; every request echoes the
  // page's CSRF token: the API requires it of cookie sessions on unsafe methods and on the
  // GETs that change state (next_item opens items).
  async function api(path, options = {}) {
    const headers = { Accept: "application/json", ...(options.headers || {}) };
    const init = { credentials: "same-origin", ...options, headers };
    if (init.body !== undefined && typeof init.body !== "string") {
      init.body = JSON.stringify(init.body);
      headers["Content-Type"] = "application/json";
    }
    headers["X-CSRF-Token"] = csrfToken(); // a same-origin header: no preflight, no leak
    const response = await fetch(path, init);
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (response.status === 401) {
      location.assign("/ui/login?next=" + encodeURIComponent(location.pathname));
    }
    if (!response.ok) {
      const info = (data && data.error) || {};
      const error = new Error(info.message || `HTTP ${response.status}`);
      error.status = response.status;
      error.code = info.code;
      throw error;
    }
    return data;
  }

  // el("td", {class: "x", dataset: {id: 1}}, "text", childNode): attributes by name, text as text.
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else if (name.startsWith("on") || name === "style") throw new Error(`refusing attribute ${name}`);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function time(seconds) {
    if (!seconds) return "";
    return new Date(seconds * 1000).toLocaleString();
  }

  function number(value, digits = 4) {
    return typeof value === "number" ? Number(value.toFixed(digits)).toString() : "";
  }

  function showError(node, error) {
    node.textContent = error && error.message ? error.message : String(error);
    node.hidden = false;
  }

  return { FINISHED, api, el, time, number, showError, csrfToken };
})();

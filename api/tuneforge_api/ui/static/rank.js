"use strict";
// /ui/feedback/{session}: one item at a time from next_item; the labeler ranks its K answers
// (drag and drop or keys 1..K), may tie, skip, flag unsafe and leave a note. A complete
// ranking is saved at once (the labels endpoint is an idempotent upsert), so a closed tab
// loses nothing. A reload asks next_item?resume=true: the item being ranked comes back, with
// its saved label, until the labeler moves on (Next or skip ask plain next_item).
(() => {
  const root = document.getElementById("rank");
  const base = `/v1/feedback/sessions/${encodeURIComponent(root.dataset.sessionId)}`;
  const $ = (id) => document.getElementById(id);
  const ui = {
    item: $("rank-item"), chat: $("chat"), answers: $("answers"), ranking: $("ranking"),
    note: $("note"), next: $("next"), tie: $("tie"), undo: $("undo"), reset: $("reset"),
    skip: $("skip"), saveState: $("save-state"), tieMode: $("tie-mode"), error: $("rank-error"),
    wait: $("rank-wait"), done: $("rank-done"), progress: $("rank-progress"), progressText: $("rank-progress-text"),
  };
  const PLACES = ["1st", "2nd", "3rd"];

  let item = null; // {id, index, messages, answers, label}
  let groups = []; // ranked answer ids, best first; a group of several is a tie
  let unsafe = new Set();
  let tieNext = false;
  let dirty = false; // changed since the last successful save
  let busy = false;

  const numberOf = (id) => item.answers.findIndex((a) => a.id === id) + 1;
  const ranked = () => new Set(groups.flat());
  const complete = () => item !== null && ranked().size === item.answers.length;

  function setSaveState(state, text) {
    ui.saveState.dataset.state = state;
    ui.saveState.className = state === "saved" ? "saved" : "";
    ui.saveState.textContent = text;
  }

  function showProgress(progress) {
    const done = progress.done_by_me;
    const total = done + progress.remaining_for_me;
    ui.progress.max = Math.max(total, 1);
    ui.progress.value = done;
    ui.progressText.textContent = `${done} of ${total} done`;
  }

  // ---- rendering: every text from the API goes in as textContent ----

  function renderChat() {
    ui.chat.replaceChildren(
      ...item.messages.map((m) =>
        TF.el("div", { class: `turn ${m.role}` }, TF.el("div", { class: "role" }, m.role), TF.el("div", { class: "content" }, m.content)),
      ),
    );
  }

  function renderAnswers() {
    const placed = ranked();
    ui.answers.replaceChildren(
      ...item.answers.map((answer, i) => {
        const flag = TF.el("input", { type: "checkbox", id: `unsafe-${i + 1}`, class: "unsafe-flag" });
        flag.checked = unsafe.has(answer.id);
        flag.addEventListener("change", () => toggleUnsafe(answer.id));
        const card = TF.el(
          "div",
          {
            class: `answer${placed.has(answer.id) ? " ranked" : ""}${unsafe.has(answer.id) ? " unsafe" : ""}`,
            draggable: "true",
            dataset: { answerId: answer.id, number: String(i + 1) },
          },
          TF.el("div", { class: "head" }, TF.el("span", { class: "num" }, String(i + 1)),
            TF.el("label", { for: `unsafe-${i + 1}` }, flag, " unsafe")),
          TF.el("div", { class: "text" }, answer.text),
        );
        card.addEventListener("click", (e) => {
          if (!e.target.closest("label, input")) place(answer.id);
        });
        draggable(card, answer.id);
        return card;
      }),
    );
  }

  function gap(index, text) {
    const node = TF.el("div", { class: "gap", dataset: { gap: String(index) } }, text || "");
    dropTarget(node, (id) => move(id, { before: groups[index] || null }));
    return node;
  }

  function renderRanking() {
    const rows = [gap(0)];
    groups.forEach((group, g) => {
      const chips = group.map((id) => {
        const n = numberOf(id);
        const chip = TF.el(
          "span",
          { class: "chip", draggable: "true", title: "click to take back", dataset: { answerId: id, number: String(n) } },
          `#${n}`,
        );
        chip.addEventListener("click", () => unplace(id));
        draggable(chip, id);
        return chip;
      });
      const row = TF.el(
        "div",
        { class: "group", dataset: { group: String(g), members: group.map(numberOf).join(",") } },
        TF.el("span", { class: "place" }, PLACES[g] || `${g + 1}th`),
        TF.el("span", { class: "members" }, ...chips),
      );
      if (g > 0) row.append(button("tie with above", "tie-up", () => tieUp(g)));
      if (group.length > 1) row.append(button("untie", "untie", () => untie(g)));
      dropTarget(row, (id) => move(id, { join: group }));
      rows.push(row, gap(g + 1));
    });
    if (!complete()) rows[rows.length - 1].textContent = groups.length ? "drop here to place next" : "drop answers here, best first";
    ui.ranking.replaceChildren(...rows);
    ui.tieMode.hidden = !tieNext;
  }

  function button(text, cls, onClick) {
    const node = TF.el("button", { type: "button", class: `secondary ${cls}` }, text);
    node.addEventListener("click", onClick);
    return node;
  }

  function render() {
    renderAnswers();
    renderRanking();
    ui.next.disabled = !complete() || busy;
    root.dataset.state = complete() ? "complete" : "ranking";
  }

  // ---- drag and drop ----

  function draggable(node, id) {
    node.addEventListener("dragstart", (e) => {
      e.dataTransfer.setData("text/plain", id);
      e.dataTransfer.effectAllowed = "move";
    });
  }

  function dropTarget(node, onDrop) {
    node.addEventListener("dragover", (e) => {
      e.preventDefault();
      e.stopPropagation();
      node.classList.add("drop-target");
    });
    node.addEventListener("dragleave", () => node.classList.remove("drop-target"));
    node.addEventListener("drop", (e) => {
      e.preventDefault();
      e.stopPropagation();
      node.classList.remove("drop-target");
      const id = e.dataTransfer.getData("text/plain");
      if (item && item.answers.some((a) => a.id === id)) onDrop(id);
    });
  }

  // ---- ranking edits ----

  function changed() {
    dirty = true;
    render();
    if (complete()) save();
    else setSaveState("unsaved", groups.length ? "Rank every answer to save." : "");
  }

  function without(id) {
    return groups.map((g) => g.filter((a) => a !== id)).filter((g) => g.length > 0);
  }

  function place(id) {
    const wasTie = tieNext && groups.length > 0;
    tieNext = false;
    groups = without(id);
    if (wasTie && groups.length) groups[groups.length - 1].push(id);
    else groups.push([id]);
    changed();
  }

  // target: {join: group} ties with that group; {before: group | null} makes a new group there.
  function move(id, target) {
    const kept = groups.map((g) => ({ ref: g, ids: g.filter((a) => a !== id) }));
    const result = [];
    let placed = false;
    for (const { ref, ids } of kept) {
      if (target.before && ref === target.before) {
        result.push([id]);
        placed = true;
      }
      if (target.join && ref === target.join) {
        ids.push(id);
        placed = true;
      }
      if (ids.length) result.push(ids);
    }
    if (!placed) result.push([id]);
    groups = result;
    changed();
  }

  function unplace(id) {
    groups = without(id);
    changed();
  }

  function tieUp(g) {
    groups = [...groups.slice(0, g - 1), [...groups[g - 1], ...groups[g]], ...groups.slice(g + 1)];
    changed();
  }

  function untie(g) {
    groups = [...groups.slice(0, g), ...groups[g].map((id) => [id]), ...groups.slice(g + 1)];
    changed();
  }

  function undo() {
    const last = groups[groups.length - 1];
    if (last) unplace(last[last.length - 1]);
  }

  function reset() {
    groups = [];
    tieNext = false;
    changed();
  }

  function toggleUnsafe(id) {
    if (unsafe.has(id)) unsafe.delete(id);
    else unsafe.add(id);
    changed();
  }

  // ---- saving and moving on ----

  async function post(body) {
    return TF.api(`${base}/items/${encodeURIComponent(item.id)}/labels`, { method: "POST", body });
  }

  // Saves run one after another, each sending the state of its own moment, so the last
  // request the server sees is always the newest state.
  let saving = Promise.resolve(true);

  function save() {
    saving = saving.then(saveNow, saveNow);
    return saving;
  }

  function snapshot() {
    return JSON.stringify({ ranking: groups, skipped: false, unsafe: [...unsafe], note: ui.note.value });
  }

  async function saveNow() {
    if (!complete()) return false;
    const sent = snapshot();
    setSaveState("saving", "Saving…");
    try {
      await post(JSON.parse(sent));
    } catch (error) {
      setSaveState("error", `Not saved: ${error.message}`);
      return false;
    }
    if (snapshot() === sent) {
      dirty = false;
      setSaveState("saved", "Saved");
    }
    return true;
  }

  async function next() {
    if (!complete() || busy) return;
    busy = true;
    render();
    const ok = await (dirty ? save() : saving); // also waits for a save still in flight
    busy = false;
    if (ok) await load();
    else render();
  }

  async function skip() {
    if (!item || busy) return;
    busy = true;
    try {
      await saving; // a save in flight must not land after the skip
      await post({ ranking: [], skipped: true, unsafe: [...unsafe], note: ui.note.value });
      busy = false;
      await load();
    } catch (error) {
      busy = false;
      setSaveState("error", `Not saved: ${error.message}`);
    }
  }

  function showItem(found) {
    item = found;
    const label = item.label || null;
    groups = label && label.ranking ? label.ranking.map((g) => [...g]) : [];
    unsafe = new Set((label && label.unsafe) || []);
    ui.note.value = (label && label.note) || "";
    tieNext = false;
    dirty = false;
    root.dataset.itemId = item.id;
    ui.item.hidden = false;
    renderChat();
    render();
    setSaveState(complete() ? "saved" : "unsaved", complete() ? "Saved" : "");
  }

  async function waitForSession() {
    const session = await TF.api(base);
    const p = session.progress || {};
    if (session.status === "generating") {
      ui.wait.textContent = `The answers are still being generated (${p.prompts_generated || 0} of ${p.prompts_total || "?"} prompts); this page continues by itself.`;
      ui.wait.hidden = false;
      root.dataset.state = "generating";
      setTimeout(() => load(true), 3000);
    } else {
      TF.showError(ui.error, `This session is ${session.status}; there is nothing to rank.`);
      root.dataset.state = session.status;
    }
  }

  async function load(resume = false) {
    try {
      const data = await TF.api(`${base}/next_item${resume ? "?resume=true" : ""}`);
      ui.wait.hidden = true;
      ui.error.hidden = true;
      showProgress(data.progress);
      if (data.item) {
        showItem(data.item);
      } else {
        item = null;
        ui.item.hidden = true;
        ui.done.hidden = false;
        root.dataset.state = "done";
      }
    } catch (error) {
      if (error.status === 409) await waitForSession().catch((e) => TF.showError(ui.error, e));
      else TF.showError(ui.error, error);
    }
  }

  // ---- keys ----

  document.addEventListener("keydown", (e) => {
    if (!item || e.ctrlKey || e.metaKey || e.altKey || e.target.closest("textarea, input[type=text]")) return;
    // A focused button or checkbox answers Enter and Space itself.
    if ((e.key === "Enter" || e.key === " ") && e.target.closest("button, input")) return;
    const digit = /^(?:Digit|Numpad)([1-9])$/.exec(e.code);
    if (digit) {
      const answer = item.answers[Number(digit[1]) - 1];
      if (!answer) return;
      e.preventDefault();
      if (e.shiftKey) toggleUnsafe(answer.id);
      else place(answer.id);
      return;
    }
    const actions = {
      t: () => { tieNext = !tieNext; render(); },
      "=": () => { tieNext = !tieNext; render(); },
      Backspace: undo,
      r: reset,
      s: skip,
      Enter: next,
    };
    const action = actions[e.key.length === 1 ? e.key.toLowerCase() : e.key];
    if (action) {
      e.preventDefault();
      action();
    }
  });

  dropTarget(ui.answers, unplace);
  ui.note.addEventListener("change", () => {
    if (complete()) {
      dirty = true;
      save();
    }
  });
  ui.next.addEventListener("click", next);
  ui.tie.addEventListener("click", () => { tieNext = !tieNext; render(); });
  ui.undo.addEventListener("click", undo);
  ui.reset.addEventListener("click", reset);
  ui.skip.addEventListener("click", skip);
  load(true);
})();

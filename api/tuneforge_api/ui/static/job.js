"use strict";
// /ui/jobs/{id}: summary, live loss curve and events (from the SSE event stream), checkpoints,
// resolved hyperparameters and the adapter download.
(() => {
  const root = document.getElementById("job");
  const base = `/v1/fine_tuning/jobs/${encodeURIComponent(root.dataset.jobId)}`;
  const canvas = document.getElementById("loss-chart");
  const eventsList = document.getElementById("events");
  const errorBox = document.getElementById("job-error");
  const MAX_EVENTS_SHOWN = 1000;
  const train = new Map(); // step -> loss; a resumed attempt's repeat of a step replaces it
  const valid = new Map();
  let latestStep = null;
  let finished = false;
  let drawPending = false;

  function sorted(map) {
    return [...map.entries()].sort((a, b) => a[0] - b[0]);
  }

  function redraw() {
    drawPending = false;
    TFChart.draw(canvas, [
      { label: "training loss", color: "#2f6fde", points: sorted(train) },
      { label: "validation loss", color: "#e07b20", points: sorted(valid), dots: true },
    ]);
    canvas.dataset.trainPoints = String(train.size);
    canvas.dataset.validPoints = String(valid.size);
    document.getElementById("chart-empty").hidden = train.size + valid.size > 0;
  }

  function scheduleDraw() {
    if (!drawPending) {
      drawPending = true;
      requestAnimationFrame(redraw);
    }
  }

  function addEvent(event) {
    const data = event.data || {};
    if (event.type === "metrics" && typeof data.step === "number") {
      if (typeof data.train_loss === "number") train.set(data.step, data.train_loss);
      if (typeof data.valid_loss === "number") valid.set(data.step, data.valid_loss);
      if (data.total_steps) latestStep = data;
      scheduleDraw();
    }
    const item = TF.el(
      "li",
      { class: `event ${event.level}`, dataset: { type: event.type } },
      TF.el("time", {}, TF.time(event.created_at)),
      " ",
      TF.el("span", { class: "message" }, event.message),
    );
    eventsList.prepend(item);
    if (eventsList.children.length > MAX_EVENTS_SHOWN) eventsList.lastElementChild.remove();
  }

  function summaryRow(list, term, value) {
    if (value === undefined || value === null || value === "") return;
    list.append(TF.el("dt", {}, term), TF.el("dd", {}, value));
  }

  function renderJob(job) {
    const list = document.getElementById("job-summary");
    list.replaceChildren();
    summaryRow(list, "Status", TF.el("span", { class: `status ${job.status}`, id: "job-status" }, job.status));
    summaryRow(list, "Model", job.model);
    summaryRow(list, "Method", job.method && job.method.type);
    summaryRow(list, "Fine-tuned model", job.fine_tuned_model);
    if (latestStep && job.status === "running") {
      summaryRow(list, "Progress", `step ${latestStep.step} of ${latestStep.total_steps}`);
    }
    summaryRow(list, "Trained tokens", job.trained_tokens);
    summaryRow(list, "Created", TF.time(job.created_at));
    summaryRow(list, "Finished", TF.time(job.finished_at));
    if (job.error) summaryRow(list, "Error", `${job.error.code}: ${job.error.message}`);
    // A sample job (feedback session) publishes answers, not an adapter.
    const sample = job.method && job.method.type === "sample";
    document.getElementById("download").hidden = job.status !== "succeeded" || sample;
    renderHyperparameters(job);
    finished = TF.FINISHED.has(job.status);
  }

  function renderHyperparameters(job) {
    const type = job.method && job.method.type;
    const fromMethod = (type && job.method[type] && job.method[type].hyperparameters) || {};
    const values = { ...job.hyperparameters, ...fromMethod, seed: job.seed };
    if (job.lora) values.lora = job.lora;
    if (job.quantization) values.quantization = job.quantization;
    const rows = Object.entries(values)
      .filter(([, v]) => v !== null && v !== undefined)
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([k, v]) =>
        TF.el("tr", {}, TF.el("th", {}, k), TF.el("td", { class: "mono" }, typeof v === "object" ? JSON.stringify(v) : String(v))),
      );
    document.querySelector("#hyperparameters tbody").replaceChildren(...rows);
  }

  async function loadCheckpoints() {
    const page = await TF.api(`${base}/checkpoints?limit=100`);
    const rows = page.data.map((c) =>
      TF.el(
        "tr",
        {},
        TF.el("td", {}, c.step_number),
        TF.el("td", { class: "mono" }, c.id),
        TF.el("td", {}, TF.number(c.metrics.train_loss)),
        TF.el("td", {}, TF.number(c.metrics.valid_loss)),
        TF.el("td", {}, TF.time(c.created_at)),
      ),
    );
    document.querySelector("#checkpoints tbody").replaceChildren(...rows);
    document.getElementById("checkpoints-empty").hidden = rows.length > 0;
  }

  async function refresh() {
    try {
      renderJob(await TF.api(base));
      await loadCheckpoints();
      errorBox.hidden = true;
    } catch (error) {
      TF.showError(errorBox, error);
    }
  }

  // Oldest first from the start; EventSource resumes with Last-Event-ID after a drop.
  const stream = new EventSource(`${base}/events?stream=true`);
  stream.addEventListener("event", (message) => addEvent(JSON.parse(message.data)));
  stream.addEventListener("done", () => {
    stream.close();
    refresh();
  });
  stream.addEventListener("error", () => {
    if (stream.readyState === EventSource.CLOSED) TF.showError(errorBox, "The live event stream closed.");
  });

  refresh();
  const timer = setInterval(() => (finished ? clearInterval(timer) : refresh()), 5000);
  window.addEventListener("resize", scheduleDraw);
  redraw();
})();

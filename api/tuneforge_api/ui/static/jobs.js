"use strict";
// /ui/jobs: the project's jobs, newest first, refreshed every 5 s while the page is open.
(() => {
  const tbody = document.querySelector("#jobs tbody");
  const empty = document.getElementById("jobs-empty");
  const more = document.getElementById("jobs-more");
  const errorBox = document.getElementById("jobs-error");
  const PAGE = 20;
  let wanted = PAGE;

  // A running job's progress: its newest step event (events come newest first).
  async function progressOf(job) {
    if (job.status === "succeeded") return 1;
    if (job.status !== "running") return null;
    const id = encodeURIComponent(job.id);
    const page = await TF.api(`/v1/fine_tuning/jobs/${id}/events?limit=50`);
    const step = page.data.find((e) => e.type === "metrics" && e.data && e.data.total_steps);
    return step ? step.data.step / step.data.total_steps : 0;
  }

  function progressCell(fraction) {
    if (fraction === null) return TF.el("td", {}, "—");
    const pct = Math.round(fraction * 100);
    return TF.el("td", {}, TF.el("progress", { max: "100", value: String(pct) }), ` ${pct}%`);
  }

  function row(job, fraction) {
    const link = TF.el("a", { href: `/ui/jobs/${encodeURIComponent(job.id)}`, class: "mono" }, job.id);
    return TF.el(
      "tr",
      { dataset: { jobId: job.id, status: job.status } },
      TF.el("td", {}, link),
      TF.el("td", {}, job.model),
      TF.el("td", {}, (job.method && job.method.type) || ""),
      TF.el("td", {}, TF.el("span", { class: `status ${job.status}` }, job.status)),
      progressCell(fraction),
      TF.el("td", {}, TF.time(job.created_at)),
    );
  }

  async function fetchJobs() {
    const found = [];
    let after = null;
    let hasMore = true;
    while (hasMore && found.length < wanted) {
      const query = new URLSearchParams({ limit: String(Math.min(100, wanted - found.length)) });
      if (after) query.set("after", after);
      const page = await TF.api(`/v1/fine_tuning/jobs?${query}`);
      found.push(...page.data);
      hasMore = page.has_more;
      after = page.last_id;
    }
    return { jobs: found, hasMore };
  }

  async function refresh() {
    try {
      const { jobs, hasMore } = await fetchJobs();
      const progress = await Promise.all(jobs.map((job) => progressOf(job).catch(() => null)));
      tbody.replaceChildren(...jobs.map((job, i) => row(job, progress[i])));
      empty.hidden = jobs.length > 0;
      more.hidden = !hasMore;
      errorBox.hidden = true;
    } catch (error) {
      TF.showError(errorBox, error);
    }
  }

  more.addEventListener("click", () => {
    wanted += PAGE;
    refresh();
  });
  refresh();
  setInterval(refresh, 5000);
})();

// The status line of the background fine-tunes that `scratchgpt serve` runs (GET /api/v1/jobs):
// each job's progress while it runs, "ready" once the service serves what it made, and a
// failure with the path of its log. Polls while a job is active, then stops.

import { api } from "./api.js";

const POLL_MS = 2000;
const line = document.getElementById("job-status");
const seenActive = new Set(); // jobs seen queued or running on this page: their end is news here

function item(job) {
  const row = document.createElement("div");
  row.className = "job-line";
  row.dataset.state = job.state;
  const text = document.createElement("span");
  text.textContent = job.summary;
  row.append(text);
  if (job.state === "running" && job.fraction !== null) {
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = job.fraction;
    bar.setAttribute("aria-label", `${job.title} progress`);
    row.append(bar);
  }
  return row;
}

function show(jobs) {
  for (const job of jobs) if (job.state === "queued" || job.state === "running") seenActive.add(job.name);
  // A job done before this page opened is old news; its model is simply there.
  const shown = jobs.filter((job) => job.state !== "done" || seenActive.has(job.name));
  line.replaceChildren(...shown.map(item));
  line.hidden = shown.length === 0;
}

async function poll() {
  let active = false;
  try {
    const data = await api("/api/v1/jobs");
    show(data.jobs);
    active = data.active;
  } catch {
    return; // signed out or the server is gone: the page's own banner says so
  }
  if (active) setTimeout(poll, POLL_MS);
}

if (line) poll();

// Live updates from the portal's server-sent events (only runs this user may see arrive here): state badges,
// progress bars of running jobs, and on a running job's page its log as it grows.
(function () {
  "use strict";
  const url = document.body.dataset.events;
  if (!url || !window.EventSource) return;
  const watch = document.getElementById("watch");
  const live = document.getElementById("live");
  const log = document.getElementById("log");
  const source = new EventSource(live ? url + "?job=" + encodeURIComponent(live.dataset.job) : url);

  function badge(element, event) {
    element.textContent = event.outcome || event.state;
    element.className = "state state-" + (event.warnings && event.state === "succeeded" ? "warnings" : event.state);
  }

  function seconds(value) {
    if (value < 60) return (value < 10 ? value.toFixed(1) : value.toFixed(0)) + " s";
    const m = Math.floor(value / 60), s = Math.round(value % 60);
    return m + " min " + String(s).padStart(2, "0") + " s";
  }

  source.addEventListener("status", function (message) {
    const event = JSON.parse(message.data);
    let known = false;
    document.querySelectorAll('.state[data-job="' + event.job_id + '"]').forEach(function (element) {
      badge(element, event);
      known = true;
    });
    if (live && live.dataset.job === event.job_id && ["queued", "running"].indexOf(event.state) < 0) {
      document.getElementById("finished").hidden = false;  // the results are on the reloaded page
      const progress = document.getElementById("progress");
      progress.value = 1;
    }
    const run = event.instrument + "/" + event.rb_number + "/" + event.run;
    if (watch && watch.dataset.run === run && !known) {
      document.getElementById("new-versions").hidden = false;  // a rerun of this run became a job
    }
    const table = document.getElementById("runs");
    if (table && !known) {
      const row = table.querySelector('tr[data-run="' + run + '"]');
      if (!row) {
        document.getElementById("new-runs").hidden = false;
      } else if (event.latest_job === event.job_id) {  // a new version became the run's latest
        const element = row.querySelector(".state");
        element.dataset.job = event.job_id;
        badge(element, event);
      }
    }
    if (table && ["queued", "running"].indexOf(event.state) < 0) {
      document.querySelectorAll('[data-progress="' + event.job_id + '"]').forEach(function (bar) { bar.remove(); });
    }
  });

  source.addEventListener("progress", function (message) {
    const event = JSON.parse(message.data);
    document.querySelectorAll('[data-progress="' + event.job_id + '"]').forEach(function (bar) {
      bar.querySelector("progress").value = event.fraction;
      bar.querySelector(".progress-text").textContent = event.done ? "done" : "cell " + event.cell + "/" + event.cells;
    });
    if (live && live.dataset.job === event.job_id) {
      document.getElementById("progress").value = event.fraction;
      document.getElementById("progress-text").textContent = event.done ? "finished after " + seconds(event.elapsed)
        : "cell " + event.cell + " of " + event.cells + ": " + event.label + " · " + seconds(event.elapsed);
    }
  });

  source.addEventListener("log", function (message) {
    const event = JSON.parse(message.data);
    if (!log || !live || live.dataset.job !== event.job_id) return;
    if (event.reset) log.textContent = "";
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    event.lines.forEach(function (line) {
      const span = document.createElement("span");
      span.className = line.stream;
      span.textContent = line.text + "\n";
      log.appendChild(span);
    });
    if (atBottom) log.scrollTop = log.scrollHeight;
  });
})();

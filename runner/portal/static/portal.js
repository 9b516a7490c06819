// Live state updates from the portal's server-sent events (only runs this user may see arrive here).
(function () {
  "use strict";
  const url = document.body.dataset.events;
  if (!url || !window.EventSource) return;
  const watch = document.getElementById("watch");
  const source = new EventSource(url);
  source.addEventListener("status", function (message) {
    const event = JSON.parse(message.data);
    let known = false;
    document.querySelectorAll('[data-job="' + event.job_id + '"]').forEach(function (badge) {
      badge.textContent = event.state;
      badge.className = "state state-" + event.state;
      known = true;
    });
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
        const badge = row.querySelector(".state");
        badge.dataset.job = event.job_id;
        badge.textContent = event.state;
        badge.className = "state state-" + event.state;
      }
    }
  });
})();

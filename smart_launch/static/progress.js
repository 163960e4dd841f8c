// Follow an analysis job: poll its JSON status, show progress, open the results once they are filed.
// No token ever reaches this script: the status endpoint answers for the browser's own session only.
(function () {
  "use strict";
  var root = document.getElementById("job");
  if (!root) { return; }
  var url = root.getAttribute("data-status-url");
  var bar = document.getElementById("job-progress");
  var step = document.getElementById("job-step");
  var errorBox = document.getElementById("job-error");
  var percent = document.getElementById("job-percent");
  // The status URL long-polls (?wait=1): it answers as soon as the job finishes, or after a second with
  // the latest progress, so the next request can follow at once.
  var delay = 50;

  function show(status) {
    bar.value = status.progress;
    bar.textContent = Math.round(status.progress * 100) + "%";
    percent.textContent = Math.round(status.progress * 100) + "% done";
    var state = status.state.charAt(0).toUpperCase() + status.state.slice(1);
    step.textContent = state + (status.step ? ": " + status.step : "");
    if (status.state === "done" && status.reportUrl) {
      window.location.assign(status.reportUrl);
      return false;
    }
    if (status.state === "failed") {
      document.getElementById("job-error-message").textContent = status.error ? status.error.message : "";
      document.getElementById("job-error-remedy").textContent = status.error ? status.error.remedy : "";
      errorBox.hidden = false;
      return false;
    }
    return true;
  }

  function poll() {
    fetch(url, { headers: { "Accept": "application/json" }, credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (status) {
        if (show(status)) { window.setTimeout(poll, delay); }
      })
      .catch(function () {
        step.textContent = "Lost contact with the app; retrying…";
        window.setTimeout(poll, 2000);
      });
  }
  poll();
})();

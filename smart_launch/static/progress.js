// Follow an analysis job: long-poll its JSON status, show progress, open the results once they are filed.
// On the study page it also starts the job: the Analyze form is sent in the background, the progress is
// shown in place, and so are the results once filed (the progress page and the result page stay the path
// without JavaScript). No token ever reaches this script: every URL answers for the browser's own session only.
(function () {
  "use strict";
  // Back from a result shown in place (or Forward to it again, from the study page reloaded meanwhile) changes
  // only the address: load the page that address names. (A jump within the page, such as the skip link's, keeps
  // the path and stays a jump.)
  var shownPath = window.location.pathname;
  window.addEventListener("popstate", function () {
    if (window.location.pathname !== shownPath) { window.location.reload(); }
  });
  var root = document.getElementById("job");
  if (!root) { return; }
  var bar = document.getElementById("job-progress");
  var step = document.getElementById("job-step");
  var errorBox = document.getElementById("job-error");
  var percent = document.getElementById("job-percent");
  // The status URL long-polls (?wait=1): it answers as soon as the job finishes, or after a second with
  // the latest progress, so the next request can follow at once.
  var delay = 50;

  function fail(message, remedy) {
    document.getElementById("job-error-message").textContent = message;
    document.getElementById("job-error-remedy").textContent = remedy;
    errorBox.hidden = false;
  }

  function show(status) {
    bar.value = status.progress;
    bar.textContent = Math.round(status.progress * 100) + "%";
    percent.textContent = Math.round(status.progress * 100) + "% done";
    var state = status.state.charAt(0).toUpperCase() + status.state.slice(1);
    step.textContent = state + (status.step ? ": " + status.step : "");
    if (status.state === "done" && status.reportUrl) {
      if (status.resultHtml) {
        showResult(status);
      } else {
        window.location.assign(status.reportUrl);
      }
      return false;
    }
    if (status.state === "failed") {
      fail(status.error ? status.error.message : "", status.error ? status.error.remedy : "");
      return false;
    }
    return true;
  }

  // How long the result waits for its explanation images before it is shown without them (they then appear as
  // they arrive, as on the result page).
  var IMAGE_WAIT_MS = 3000;

  // The result, rendered by the app (autoescaped, from the report it just filed), replaces the study page's
  // content, and the address becomes the result page's, as if it had been opened: Back returns to the study,
  // a reload shows the result page itself. Focus moves to the result's heading, as a new page would put it.
  // It is first built off screen, where its images load and decode, and then placed whole: the clinician sees
  // the findings and their explanation images together, without the page reflowing under the reader as each
  // image arrives, and the browser paints once instead of once per image.
  function showResult(status) {
    var staged = document.createElement("div");
    staged.innerHTML = status.resultHtml;
    var decoded = Array.prototype.map.call(staged.querySelectorAll("img"), function (img) {
      return img.decode().catch(function () { return null; });  // a broken image is shown as the page shows it
    });
    var waited = new Promise(function (resolve) { window.setTimeout(resolve, IMAGE_WAIT_MS); });
    Promise.race([Promise.all(decoded), waited]).then(function () { placeResult(staged, status); });
  }

  function placeResult(staged, status) {
    var main = document.getElementById("main");
    main.replaceChildren.apply(main, Array.prototype.slice.call(staged.childNodes));
    document.title = status.resultTitle;
    window.history.pushState({ imagingCdsResult: status.reportUrl }, "", status.reportUrl);
    shownPath = window.location.pathname;
    var heading = main.querySelector("h1");
    if (heading) {
      heading.setAttribute("tabindex", "-1");
      heading.focus();
    }
  }

  function poll(url) {
    fetch(url, { headers: { "Accept": "application/json" }, credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (response.status >= 400 && response.status < 500) {
          // The app refused (the launch ended, the job is not this session's): retrying cannot help; say why.
          return response.json().then(function (body) {
            fail(body.message || "The app refused to report on this analysis.", body.remedy || "");
            return null;
          });
        }
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (status) {
        if (status && show(status)) { window.setTimeout(function () { poll(url); }, delay); }
      })
      .catch(function () {
        step.textContent = "Lost contact with the app; retrying…";
        window.setTimeout(function () { poll(url); }, 2000);
      });
  }

  var form = document.querySelector("form.analyze-form");
  if (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var button = document.getElementById("analyze-button");
      button.disabled = true;
      errorBox.hidden = true;
      root.hidden = false;
      step.textContent = "Starting the analysis…";
      // The answer waits for the job (as a status poll does), so a quick analysis needs no other request.
      var start = new URL(form.action, window.location.href);
      start.searchParams.set("wait", "1");
      start.searchParams.set("inline", "1");
      fetch(start.href, {
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
        headers: { "Accept": "application/json" },
        credentials: "same-origin",
        cache: "no-store"
      })
        .then(function (response) {
          return response.json().then(function (body) { return { ok: response.ok, body: body }; });
        })
        .then(function (answer) {
          if (!answer.ok) {
            button.disabled = false;
            fail(answer.body.message || "The analysis could not be started.", answer.body.remedy || "");
            return;
          }
          if (show(answer.body)) { poll(answer.body.statusUrl); }
        })
        .catch(function () {
          form.submit();  // no usable answer: fall back to the plain form post and its progress page
        });
    });
  } else if (root.getAttribute("data-status-url")) {
    poll(root.getAttribute("data-status-url"));
  }
})();

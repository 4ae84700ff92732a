// salt-steward dashboard: one event stream per tab (GET /events). When the
// registry changed, each element of the page marked data-fragment="URL" is
// fetched again and replaced, without reloading the page. The script sits in
// <head>: htmx's boosted navigation swaps the body and keeps this stream.
// No inline script anywhere: the CSP is default-src 'self'.
(function () {
  "use strict";
  if (!window.EventSource || !window.fetch) {
    return;
  }
  var refreshing = false;
  var again = false;

  function refresh() {
    if (refreshing) {
      again = true;
      return;
    }
    var parts = document.querySelectorAll("[data-fragment]");
    if (parts.length === 0) {
      return;
    }
    refreshing = true;
    var pending = [];
    parts.forEach(function (el) {
      var url = el.getAttribute("data-fragment");
      pending.push(
        fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "steward" } })
          .then(function (r) {
            return r.ok ? r.text() : null;
          })
          .then(function (html) {
            if (html !== null && el.isConnected) {
              el.outerHTML = html;
            }
          })
          .catch(function () {})
      );
    });
    Promise.all(pending).then(function () {
      refreshing = false;
      document.body.setAttribute("data-refreshed", String(Date.now()));
      if (again) {
        again = false;
        refresh();
      }
    });
  }

  var source = new EventSource("/events");
  source.addEventListener("hello", function () {
    document.body.setAttribute("data-live", "yes");
  });
  source.addEventListener("changed", refresh);
  source.addEventListener("error", function () {
    // The browser reconnects by itself unless the answer was not a stream
    // (the session ended): then the page stays as it is.
    document.body.setAttribute("data-live", source.readyState === EventSource.CLOSED ? "closed" : "reconnecting");
  });
})();

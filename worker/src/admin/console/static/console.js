// loginconnect console: progressive enhancement only. Every page reads and every form
// submits without this file; it adds a confirmation to forms that change something and
// refreshes lists that ask for it (never while the user is typing or has a form focused).
"use strict";
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
(function () {
  var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  if (!(seconds > 0)) {
    return;
  }
  window.setInterval(function () {
    var active = document.activeElement;
    var busy = active && active.closest && active.closest("form");
    if (!busy && document.visibilityState === "visible") {
      window.location.reload();
    }
  }, seconds * 1000);
})();

// farebox clearing console: the only script (served from the package). A page that asks for
// it (data-refresh="seconds") reloads itself, so the fleet view stays current.
document.addEventListener("DOMContentLoaded", function () {
  var marked = document.querySelector("[data-refresh]");
  if (!marked) { return; }
  var seconds = parseInt(marked.getAttribute("data-refresh"), 10);
  if (seconds > 0) { window.setTimeout(function () { window.location.reload(); }, seconds * 1000); }
});

// Counts down every "time left" of an unpaid order once a second, from its data-deadline.
// The server's clock is the reference (data-now is when the page was rendered), so a
// wrong clock on the staff member's computer does not show a wrong time left.
"use strict";
(function () {
  function formatDuration(total) {
    // The same as orders.selectors.format_duration: as precise as a glance needs.
    var seconds = Math.floor(total);
    var minutes = Math.floor(seconds / 60);
    var hours = Math.floor(minutes / 60);
    var days = Math.floor(hours / 24);
    seconds %= 60;
    minutes %= 60;
    hours %= 24;
    if (days) return days + "d " + hours + "h";
    if (hours) return hours + "h " + minutes + "m";
    return minutes ? minutes + "m " + seconds + "s" : seconds + "s";
  }

  function start() {
    var timers = [];
    document.querySelectorAll("[data-deadline]").forEach(function (el) {
      var deadline = Date.parse(el.dataset.deadline);
      var serverNow = Date.parse(el.dataset.now);
      if (isNaN(deadline)) return;
      timers.push({el: el, deadline: deadline, skew: isNaN(serverNow) ? 0 : Date.now() - serverNow});
    });
    if (!timers.length) return;
    function tick() {
      timers.forEach(function (t) {
        var left = (t.deadline - (Date.now() - t.skew)) / 1000;
        var text = left > 0 ? formatDuration(left) : "overdue";
        if (t.el.textContent !== text) t.el.textContent = text;
        t.el.classList.toggle("orders-overdue", left <= 0);
      });
    }
    tick();
    window.setInterval(tick, 1000);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();

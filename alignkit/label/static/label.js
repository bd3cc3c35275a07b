// alignkit label: keyboard shortcuts and the time spent per item. The page works without this file.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var form = document.getElementById("label-form");
  if (!form) { return; }
  var started = Date.now();
  var choiceKeys = { a: "A", b: "B", t: "tie", x: "both_bad" };
  var submitButton = document.getElementById("submit-button");
  var skipButton = document.getElementById("skip-button");
  var hint = document.getElementById("hint");

  // the rubric line under each rating scale follows the chosen (or hovered) score
  Array.prototype.forEach.call(form.querySelectorAll(".scale"), function (scale) {
    var line = scale.nextElementSibling;
    function show(text) { line.textContent = text || ""; }
    function chosen() {
      var input = scale.querySelector("input:checked");
      var label = input ? scale.querySelector("label[for='" + input.id + "']") : null;
      return label ? label.getAttribute("data-rubric") : "";
    }
    scale.addEventListener("change", function () { show(chosen()); });
    Array.prototype.forEach.call(scale.querySelectorAll("label[data-rubric]"), function (label) {
      label.addEventListener("mouseenter", function () { show(label.getAttribute("data-rubric")); });
      label.addEventListener("mouseleave", function () { show(chosen()); });
    });
  });

  form.addEventListener("submit", function () {
    form.elements.seconds.value = ((Date.now() - started) / 1000).toFixed(1);
  });

  function typing(target) {
    return target.tagName === "TEXTAREA" ||
      (target.tagName === "INPUT" && ["text", "password", "search"].indexOf(target.type) >= 0);
  }

  function submitChoice() {
    if (!form.querySelector("input[name=choice]:checked")) {
      hint.textContent = "Choose A, B, tie or both bad first (keys a, b, t, x).";
      hint.classList.add("warn");
      return;
    }
    form.requestSubmit(submitButton);
  }

  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.metaKey) { return; }
    if (typing(event.target)) {
      if (event.key === "Escape") { event.target.blur(); }
      else if (event.key === "Enter" && event.ctrlKey) { event.preventDefault(); submitChoice(); }
      return;
    }
    if (event.ctrlKey) { return; }
    var key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    if (choiceKeys[key]) {
      event.preventDefault();
      var input = document.getElementById("choice-" + choiceKeys[key]);
      input.checked = true;
      input.focus();
    } else if (key === "Enter") {
      event.preventDefault();
      submitChoice();
    } else if (key === "s") {
      event.preventDefault();
      form.requestSubmit(skipButton);
    } else if (key === "r") {
      event.preventDefault();
      document.getElementById("reason").focus();
    }
  });
});

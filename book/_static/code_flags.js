// The book's only script: a short command-line flag in inline code (`--resume`, `-n 2`) is kept on one line, so a
// line break never falls after its leading dashes ("--" / "resume"). Longer code keeps the theme's wrapping, so a
// long key still fits a phone's column.
document.addEventListener("DOMContentLoaded", () => {
  for (const span of document.querySelectorAll("code.literal span.pre")) {
    const text = span.textContent;
    if (text.startsWith("-") && text.length <= 32) span.style.whiteSpace = "nowrap";
  }
});

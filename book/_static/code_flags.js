// The book's only script. (1) A short command-line flag in inline code (`--resume`, `-n 2`) is kept on one line, so
// a line break never falls after its leading dashes ("--" / "resume"). Longer code keeps the theme's wrapping, so a
// long key still fits a phone's column. (2) In the page's contents (the right-hand sidebar), a long identifier such
// as token_logprobs_and_entropy_from_hidden() breaks after an underscore or a dot, not in the middle of a word:
// a break opportunity (<wbr>) follows each of them, and layout.css lets the entries break only there. So does a
// long key in running text (algorithm.adv_estimator=grpo_vectorized: after "_", "=", "/" or a "." before a name), where the theme's
// break-anywhere remains the fallback for a piece that alone is wider than the column. (3) Punctuation
// right after inline math ("$x$," in the source) stays on the formula's line: the formula and the first character
// after it go into one unbreakable span, before MathJax renders the formula inside it.
document.addEventListener("DOMContentLoaded", () => {
  for (const math of document.querySelectorAll("span.math")) {
    const next = math.nextSibling;
    if (!next || next.nodeType !== Node.TEXT_NODE || !/^[.,;:!?)\]]/.test(next.data)) continue;
    const glued = document.createElement("span");
    glued.style.whiteSpace = "nowrap";
    math.replaceWith(glued);
    glued.append(math, next.data[0]);
    next.data = next.data.slice(1);
  }
  for (const span of document.querySelectorAll("code.literal span.pre")) {
    const text = span.textContent;
    if (text.startsWith("-") && text.length <= 32) span.style.whiteSpace = "nowrap";
  }
  const long = (span) => span.closest("nav.page-toc") || span.textContent.length > 20;
  for (const span of document.querySelectorAll("nav.page-toc code span.pre, article code.literal span.pre")) {
    if (!long(span) || span.closest("table")) continue;
    const parts = span.textContent.split(/(?<=[_=/])|(?<=\.)(?=[A-Za-z_])/);
    if (parts.length < 2) continue;
    span.replaceChildren(...parts.flatMap((part, i) => (i ? [document.createElement("wbr"), part] : [part])));
  }
});

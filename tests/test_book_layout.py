"""The book as its readers see it: nothing cut at a laptop's 1280 px nor at a phone's 400 px.

Fast checks on the sources (no browser):

* every line of every notebook code cell, of the text the cells print, and of every code block in ``book/*.md``
  (listings pulled in with ``literalinclude`` included) is at most ``MAX_COLUMNS`` characters: at the book's code
  font that many columns fit in the text column beside both sidebars at 1280 px;
* every figure stored in a notebook is drawn for the column (at most ``MAX_FIGURE_INCHES`` wide, at a resolution
  of at least ``MIN_FIGURE_DPI``), so its labels are not shrunk to a few pixels;
* no notebook times itself (a stated run time is true on one machine only);
* every notebook's Colab install cell installs the package from the repository named in ``_config.yml``
  (``repository.url``) at the version the book was built from (``grpo_ref.__version__``).

Slow check (``test_built_pages_cut_nothing``): the book is built into a temporary folder and every page is
rendered in headless Chromium at 1280 and 400 px. A display equation, an inline formula (which cannot wrap), a
table, code block or image fails the test when it is cut (content wider than an element that does not scroll),
when it sticks out of the text column, or when the page itself scrolls sideways; an identifier in the page's contents
(the right-hand sidebar) fails it when it wraps in the middle of a word rather than after ``_`` or ``.``, so does a
long key in running text (over 20 characters, outside tables) unless it breaks after ``_``, ``.``, ``=`` or where the
browser may (a space, ``-``, ``/``, ``,``, an opening bracket) or one piece alone is wider than its block, and inline
math when the punctuation right after it starts the next line alone. A container that scrolls sideways is allowed
on the phone (400 px) and nowhere at 1280 px. It needs the ``playwright`` package (requirements.txt) and a Chromium
binary (the system package ``chromium``, found on PATH or at /usr/bin/chromium; ``CHROMIUM`` overrides): without
them it is skipped with the reason, unless ``BOOK_LAYOUT_REQUIRE_BROWSER`` is set (as ``.ci/run`` does): then it fails.
``BOOK_LAYOUT_HTML=<folder of a build>`` checks that build instead of building.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from base64 import b64decode
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
PAGES_MD = sorted((REPO / "book").glob("*.md"))
MAX_COLUMNS = 88
MAX_FIGURE_INCHES = 8.5
MIN_FIGURE_DPI = 120
WIDTHS = (1280, 400)
PHONE = 400


def _nb(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _long_lines(text: str) -> list[str]:
    return [f"{len(line)}: {line[:60]}..." for line in text.splitlines() if len(line) > MAX_COLUMNS]


# ---------------------------------------------------------------------------------------------------------------
# fast checks on the sources


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_code_fits_the_column(notebook: Path) -> None:
    bad = []
    for i, cell in enumerate(_nb(notebook)["cells"]):
        if cell["cell_type"] == "code":
            bad += [f"cell {i}, {line}" for line in _long_lines(_source(cell))]
    assert not bad, f"{notebook.name}: code lines over {MAX_COLUMNS} characters:\n" + "\n".join(bad)


def _text_outputs(cell: dict):
    """The plain-text outputs of a code cell (streams, and text/plain results without a richer form)."""
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            yield "".join(out.get("text", ""))
        elif out.get("output_type") in ("execute_result", "display_data"):
            data = out.get("data", {})
            rich = {"text/html", "text/markdown", "image/png", "image/svg+xml", "text/latex"}
            if "text/plain" in data and not rich & set(data):
                yield "".join(data["text/plain"])


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_printed_text_fits_the_column(notebook: Path) -> None:
    bad = []
    for i, cell in enumerate(_nb(notebook)["cells"]):
        if cell["cell_type"] != "code" or "remove-output" in cell.get("metadata", {}).get("tags", []):
            continue
        if "remove-stderr" in cell.get("metadata", {}).get("tags", []):
            outputs = [o for o in cell.get("outputs", []) if o.get("name") != "stderr"]
            cell = {**cell, "outputs": outputs}
        for text in _text_outputs(cell):
            bad += [f"cell {i}, {line}" for line in _long_lines(text)]
    assert not bad, f"{notebook.name}: printed lines over {MAX_COLUMNS} characters:\n" + "\n".join(bad)


FENCE = re.compile(r"^(```+|~~~+)(.*)$")


def _md_code_blocks(text: str):
    """(first line number, info string, body) of each fenced block of a MyST page (math blocks excluded)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip())
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).strip()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        if not info.startswith("{math}"):
            yield start, info, body


def _included_text(page: Path, info: str, body: list[str]) -> str | None:
    """The text a ``literalinclude`` block shows (``:pyobject:`` resolved with ast, ``:lines:`` sliced)."""
    if not info.startswith("{literalinclude}"):
        return None
    target = (page.parent / info.split(None, 1)[1].strip()).resolve()
    source = target.read_text(encoding="utf-8")
    options = dict(re.findall(r"^:([\w-]+):\s*(.*)$", "\n".join(body), re.M))
    if "pyobject" in options:
        tree = ast.parse(source)
        name = options["pyobject"].strip()
        node = next(n for n in ast.walk(tree) if getattr(n, "name", None) == name)
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return "\n".join(source.splitlines()[first - 1:node.end_lineno])
    if "start-after" in options or "end-before" in options:
        after = options.get("start-after", "").strip().strip('"')
        before = options.get("end-before", "").strip().strip('"')
        if after:
            source = source[source.index(after):].split("\n", 1)[1]
        if before:
            source = source[:source.index(before)].rsplit("\n", 1)[0]
        return source
    if "lines" in options:
        lo, _, hi = options["lines"].partition("-")
        return "\n".join(source.splitlines()[int(lo) - 1:int(hi or lo)])
    return source


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_markdown_code_blocks_fit_the_column(notebook: Path) -> None:
    bad = []
    for i, cell in enumerate(_nb(notebook)["cells"]):
        if cell["cell_type"] == "markdown":
            for line_no, _, body in _md_code_blocks(_source(cell)):
                bad += [f"cell {i}, line {line_no}: {ln}" for ln in _long_lines("\n".join(body))]
    assert not bad, f"{notebook.name}: code lines over {MAX_COLUMNS} characters:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES_MD, ids=lambda p: p.stem)
def test_markdown_code_blocks_fit_the_column(page: Path) -> None:
    bad = []
    for line_no, info, body in _md_code_blocks(page.read_text(encoding="utf-8")):
        included = _included_text(page, info, body)
        if included is not None:
            bad += [f"line {line_no} ({info}): {line}" for line in _long_lines(included)]
        else:
            shown = [ln for ln in body if not re.match(r"^:[\w-]+:", ln)]
            bad += [f"line {line_no}: {line}" for line in _long_lines("\n".join(shown))]
    assert not bad, f"{page.name}: code lines over {MAX_COLUMNS} characters:\n" + "\n".join(bad)


def test_literalinclude_resolution_sees_a_long_line(tmp_path: Path) -> None:
    """The listing check reads what a listing shows: a long line inside the included function is found."""
    (tmp_path / "mod.py").write_text("def f():\n    return '" + "x" * 100 + "'\n\n\ndef g():\n    pass\n")
    page = tmp_path / "page.md"
    body = [":pyobject: f"]
    assert _long_lines(_included_text(page, "{literalinclude} mod.py", body))
    assert not _long_lines(_included_text(page, "{literalinclude} mod.py", [":pyobject: g"]))


def png_size_and_dpi(data: bytes) -> tuple[int, int, float | None]:
    """(width px, height px, dots per inch or None) of a PNG, from its IHDR and pHYs chunks."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("data is not a PNG (bad signature)")
    pos, width, height, dpi = 8, 0, 0, None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"pHYs":
            ppu_x, _, unit = struct.unpack(">IIB", body)
            dpi = ppu_x * 0.0254 if unit == 1 else None
        elif kind == b"IEND":
            break
        pos += 12 + length
    return width, height, dpi


def _png(width: int, height: int, dpi: float) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    phys = struct.pack(">IIB", round(dpi / 0.0254), round(dpi / 0.0254), 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"pHYs", phys) + chunk(b"IEND", b"")


def test_png_reader_gives_inches():
    width, height, dpi = png_size_and_dpi(_png(1200, 750, 100.0))
    assert (width, height) == (1200, 750) and dpi == pytest.approx(100.0, abs=0.01)
    with pytest.raises(ValueError, match="not a PNG"):
        png_size_and_dpi(b"GIF89a")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_figures_are_drawn_for_the_column(notebook: Path) -> None:
    bad = []
    for i, cell in enumerate(_nb(notebook)["cells"]):
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png is None:
                continue
            width, height, dpi = png_size_and_dpi(b64decode("".join(png)))
            if dpi is None:
                bad.append(f"cell {i}: PNG without a resolution (pHYs)")
                continue
            if width / dpi > MAX_FIGURE_INCHES + 0.05 or dpi < MIN_FIGURE_DPI - 1:
                bad.append(f"cell {i}: {width / dpi:.1f} x {height / dpi:.1f} in at {dpi:.0f} dpi")
    assert not bad, (
        f"{notebook.name}: figures wider than {MAX_FIGURE_INCHES} in (the page shrinks them and their text) or "
        f"below {MIN_FIGURE_DPI} dpi:\n" + "\n".join(bad)
    )


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_state_no_run_time(notebook: Path) -> None:
    timed = [
        i for i, cell in enumerate(_nb(notebook)["cells"])
        if cell["cell_type"] == "code" and re.search(r"perf_counter\(|time\.time\(|_t_start", _source(cell))
    ]
    assert not timed, f"{notebook.name}: cells {timed} time the notebook's own run (true on one machine only)"


def _config() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((REPO / "_config.yml").read_text(encoding="utf-8"))


def _version() -> str:
    init = (REPO / "grpo_ref" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', init, re.M)
    assert match, "grpo_ref/__init__.py has no __version__ line"
    return match.group(1)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_install_cell_pins_the_built_version(notebook: Path) -> None:
    url = _config()["repository"]["url"].rstrip("/")
    cells = [_source(c) for c in _nb(notebook)["cells"] if c["cell_type"] == "code"]
    install = [src for src in cells if "pip" in src and "install" in src]
    assert install, f"{notebook.name} has no install cell"
    src = install[0]
    assert "google.colab" in src, f"{notebook.name}: the install cell must run on Colab only"
    urls = set(re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", src))
    assert urls == {url}, f"{notebook.name}: install cell names {sorted(urls)}, _config.yml says {url}"
    version = re.search(r'^GRPO_REF_VERSION\s*=\s*"([^"]+)"', src, re.M)
    assert version and version.group(1) == _version(), (
        f"{notebook.name}: install cell pins {version.group(1) if version else 'nothing'}, "
        f"grpo_ref.__version__ is {_version()}"
    )
    assert "@v{GRPO_REF_VERSION}" in src, f"{notebook.name}: the pip URL must use the tag v{{GRPO_REF_VERSION}}"


# ---------------------------------------------------------------------------------------------------------------
# slow check: the built pages in a browser

CHECK_JS = r"""
() => {
  const problems = [];
  const col = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
  const colRect = col.getBoundingClientRect();
  const scrolls = (el) => ['auto', 'scroll'].includes(getComputedStyle(el).overflowX);
  const label = (el) => {
    let s = el.tagName.toLowerCase();
    if (el.id) s += '#' + el.id;
    const cls = [...el.classList].filter((c) => !c.startsWith('CtxtMenu')).slice(0, 3);
    if (cls.length) s += '.' + cls.join('.');
    return s + ' "' + (el.textContent || '').replace(/\s+/g, ' ').trim().slice(0, 70) + '"';
  };
  const kindOf = (el) => {
    if (el.matches('mjx-container:not([display="true"])')) return 'inline math';
    if (el.matches('div.math, mjx-container')) return 'math';
    if (el.matches('table')) return 'table';
    if (el.matches('img')) return 'image';
    if (el.matches('code.literal, .caption-text')) return 'text';
    return 'code';
  };
  const seen = new Set();
  const report = (el, kind, problem, excess) => {
    const key = label(el) + problem;
    if (seen.has(key)) return;
    seen.add(key);
    problems.push({kind, problem, excess: Math.round(excess), element: label(el)});
  };
  // Inline math cannot wrap: a formula wider than the column sticks out of it (unless it sits in a scrolling table).
  const SEL = 'div.math, mjx-container, table, pre, img, code.literal, .caption-text';
  for (const el of col.querySelectorAll(SEL)) {
    if (!el.getClientRects().length) continue;  // not displayed (a collapsed input, a hidden tab)
    const kind = kindOf(el);
    const excess = el.scrollWidth - el.clientWidth;
    const inline = kind === 'image' || kind === 'text' || kind === 'inline math';  // no box of their own to overflow
    if (excess > 1 && !inline) report(el, kind, scrolls(el) ? 'scrolls' : 'cut', excess);
    const r = el.getBoundingClientRect();
    const beyond = Math.max(r.right - colRect.right, colRect.left - r.left);
    if (beyond > 1) {
      let a = el.parentElement, box = null;
      while (a && a !== col) { if (scrolls(a)) { box = a; break; } a = a.parentElement; }
      if (box) {
        const ex = box.scrollWidth - box.clientWidth;
        if (ex > 1) report(box, kind, 'scrolls', ex);
      } else {
        report(el, kind, 'sticks out of the text column', beyond);
      }
    }
  }
  // the page's contents (right-hand sidebar): a long identifier wraps after "_" or "." only (code_flags.js puts a
  // break opportunity there), never in the middle of a word; found by the line each character lands on
  // and so does a long key in running text (more than 20 characters, outside tables), after "_", ".", "=" or where
  // the browser itself may break (a space, "-", "/", ",", an opening bracket); a piece wider than its block alone
  // may still break anywhere
  const inText = [...col.querySelectorAll('code.literal')].filter(
    (c) => !c.closest('table') && c.textContent.length > 20);
  for (const code of [...document.querySelectorAll('nav.page-toc code.literal'), ...inText]) {
    if (code.getClientRects().length < 2) continue;  // hidden (phone) or on one line
    const chars = [];
    const walker = document.createTreeWalker(code, NodeFilter.SHOW_TEXT);
    for (let t = walker.nextNode(); t; t = walker.nextNode()) {
      for (let i = 0; i < t.length; i++) {
        const range = document.createRange();
        range.setStart(t, i);
        range.setEnd(t, i + 1);
        const box = range.getBoundingClientRect();
        chars.push([t.data[i], box.width || box.height ? box.top : null, box.width]);
      }
    }
    const toc = !!code.closest('nav.page-toc');
    const after = toc ? /[_.\s]/ : /[_.=\s\-\/,(\[]/;
    const before = toc ? /^$/ : /[(\[]/;  // the browser also breaks before an opening bracket: "x)[0]"
    // the piece between two break opportunities around a break is wider than its block: it must break somewhere
    const tooWide = (at) => {
      let a = at, b = at;
      while (a > 0 && !after.test(chars[a - 1][0])) a--;
      while (b < chars.length && !after.test(chars[b][0])) b++;
      const w = chars.slice(a, b).reduce((sum, c) => sum + c[2], 0);
      return w > code.closest('p, li, dd, div').clientWidth;
    };
    // a line break between two visible characters is allowed when a character from the first up to the second
    // (collapsed spaces included) is one after which a break is meant
    const vis = chars.map((c, i) => (c[1] === null ? -1 : i)).filter((i) => i >= 0);
    const bad = vis.find((i, k) => k > 0 && chars[i][1] > chars[vis[k - 1]][1] + 2
      && !chars.slice(vis[k - 1], i).some((c) => after.test(c[0])) && !before.test(chars[i][0]));
    if (bad !== undefined && (toc || !tooWide(bad))) {
      report(code, toc ? 'contents' : 'inline code', 'breaks mid-word', 0);
    }
  }
  // punctuation right after inline math stays on the formula's line (code_flags.js glues the first character)
  for (const m of col.querySelectorAll('mjx-container:not([display="true"])')) {
    const host = m.parentElement && m.parentElement.matches('span.math') && !m.nextSibling ? m.parentElement : m;
    const t = host.nextSibling;
    if (!t || t.nodeType !== 3 || !/^[.,;:!?)\]]/.test(t.data) || !m.getClientRects().length) continue;
    const range = document.createRange();
    range.setStart(t, 0);
    range.setEnd(t, 1);
    if (range.getBoundingClientRect().top > m.getBoundingClientRect().bottom - 2) {
      report(m, 'inline math', 'leaves "' + t.data[0] + '" alone at the start of the next line', 0);
    }
  }
  // the theme's Previous / Next links hide what does not fit them (overflow hidden): a long title cut its chevron
  for (const a of document.querySelectorAll('.prev-next-area a')) {
    const excess = a.scrollWidth - a.clientWidth;
    if (excess > 1) report(a, 'link', 'cut', excess);
  }
  const de = document.documentElement;
  const pageExcess = de.scrollWidth - window.innerWidth;
  if (pageExcess > 1) {
    // name the culprit: descend into the child whose removal shrinks the page
    let node = document.body, culprit = 'html';
    for (let depth = 0; depth < 40 && node; depth++) {
      let found = null;
      for (const ch of node.children) {
        const old = ch.style.display;
        ch.style.display = 'none';
        const shrinks = de.scrollWidth < window.innerWidth + pageExcess;
        ch.style.display = old;
        if (shrinks) { found = ch; break; }
      }
      if (!found) break;
      culprit = label(found);
      node = found;
    }
    problems.push({kind: 'page', problem: 'the page scrolls sideways', excess: pageExcess, element: culprit});
  }
  const searches = [...document.querySelectorAll('button.search-button-field, button.search-button')]
    .filter((b) => b.getClientRects().length && getComputedStyle(b).visibility !== 'hidden');
  const header = document.querySelector('#pst-header');
  const headerShown = !!header && header.getClientRects().length > 0 && header.getBoundingClientRect().height > 0;
  return {problems, searches: searches.length, headerShown};
}
"""


def is_defect(width: int, problem: dict) -> bool:
    """A scrolling container is acceptable on a phone; everything else found by CHECK_JS cuts content."""
    return not (problem["problem"] == "scrolls" and width <= PHONE)


def _chromium() -> str | None:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    return found


@pytest.fixture(scope="module")
def built_book(tmp_path_factory) -> Path:
    """The book built from this tree into a temporary folder (notebooks are not executed: _config.yml's
    execute_notebooks is "off"). ``BOOK_LAYOUT_HTML=<folder>`` checks an existing build instead."""
    if os.environ.get("BOOK_LAYOUT_HTML"):
        return Path(os.environ["BOOK_LAYOUT_HTML"]).resolve()  # a relative folder works too
    out = tmp_path_factory.mktemp("book")
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(REPO), "--path-output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"book build failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return out / "_build" / "html"


def _pages(html: Path) -> list[Path]:
    """The book's pages (not the index, search or redirect pages)."""
    skip = {"genindex.html", "search.html", "py-modindex.html"}
    return sorted(
        p for p in html.rglob("*.html")
        if p.name not in skip and not {"_static", "_sources", "_images"} & set(p.relative_to(html).parts)
        and 'http-equiv="Refresh"' not in p.read_text(encoding="utf-8")[:2000]
    )


@pytest.mark.slow
def test_built_pages_cut_nothing(built_book: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements.txt)")
    chromium = _chromium()
    if chromium is None:
        why = "no Chromium binary (system package 'chromium'; or set CHROMIUM=/path/to/chrome)"
        if os.environ.get("BOOK_LAYOUT_REQUIRE_BROWSER"):  # .ci/run installs Chromium and sets it: never skipped there
            pytest.fail(why)
        pytest.skip(why)
    pages = _pages(built_book)
    assert len(pages) >= 5, f"the build has only {pages}"
    failures = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            for width in WIDTHS:
                page = browser.new_page(viewport={"width": width, "height": 900})
                for html in pages:
                    name = html.relative_to(built_book).as_posix()
                    # a busy machine can take long to load a page with figures: generous timeouts
                    page.goto(html.as_uri(), wait_until="load", timeout=180_000)
                    page.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise : null")
                    result = page.evaluate(CHECK_JS)
                    for p in result["problems"]:
                        line = f"{name} at {width} px: {p['kind']} {p['problem']} by {p['excess']} px: {p['element']}"
                        if is_defect(width, p):
                            failures.append(line)
                    if width > PHONE and (result["headerShown"] or result["searches"] != 1):
                        failures.append(f"{name} at {width} px: {result['searches']} search boxes, top bar shown: "
                                        f"{result['headerShown']} (one search box, in the sidebar, expected)")
                page.close()
        finally:
            browser.close()
    assert not failures, f"{len(failures)} layout defects:\n" + "\n".join(failures)


def test_defect_rule():
    """Scrolling is tolerated on the phone only; cut or protruding content never."""
    assert is_defect(1280, {"problem": "scrolls"})
    assert not is_defect(400, {"problem": "scrolls"})
    assert is_defect(400, {"problem": "cut"})
    assert is_defect(400, {"problem": "sticks out of the text column"})


@pytest.mark.slow
def test_page_contents_list_every_section_and_api_member(built_book: Path) -> None:
    """The right-hand contents of every page link each of its second- and third-level sections and, on the API
    pages, each documented member (function, class, method, attribute): a reader on a long page finds everything
    from the sidebar."""
    import bs4  # a dependency of the book's theme (pydata-sphinx-theme)

    missing, pages = [], 0
    for page in _pages(built_book):
        soup = bs4.BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
        article, nav = soup.select_one("article"), soup.select_one("nav.page-toc")
        if article is None:
            continue
        targets = [h.find_parent("section").get("id") for h in article.select("section > h2, section > h3")]
        targets += [dt.get("id") for dt in article.select("dl.py > dt[id]")]
        if not targets:
            continue
        pages += 1
        links = {a.get("href", "").rsplit("#", 1)[-1] for a in nav.select("a")} if nav else set()
        missing += [f"{page.relative_to(built_book)}#{t}" for t in targets if t and t not in links]
    assert pages > 20, pages
    assert not missing, f"{len(missing)} entries missing from the page contents: {missing[:10]}"

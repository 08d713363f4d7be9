"""Draw ``training_step.svg``: the data flow of one training step of ``grpo_ref.trainer.Trainer``.

Plain SVG written by hand (no plotting library, no fonts to embed), laid out as one narrow column so that it stays
readable at a phone's 400 px. Run from anywhere: ``python book/figures/training_step.py`` rewrites the SVG next to
this file; ``--check`` exits 1 if the committed SVG differs from what this script draws.
"""
from __future__ import annotations

import sys
from pathlib import Path
from xml.sax.saxutils import escape

W = 400  # viewBox width
PAD = 10
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
COLORS = {
    "plain": ("#eef3fb", "#3a5a8c"),  # fill, stroke
    "algo": ("#fdebd3", "#c0661a"),  # depends on the algorithm
    "ppo": ("#f4f4f4", "#777777"),  # PPO only
}


class Svg:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def box(self, x, y, w, h, title, lines=(), kind="plain", dashed=False):
        fill, stroke = COLORS[kind]
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        self.parts.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" fill="{fill}" '
                          f'stroke="{stroke}" stroke-width="1.5"{dash}/>')
        cy = y + 19
        self.text(x + w / 2, cy, title, size=14, weight="bold")
        for line in lines:
            cy += 17
            mono = line.startswith("`") and line.endswith("`") and line.count("`") == 2
            self.text(x + w / 2, cy, line.replace("`", ""), size=12.5, mono=mono)
        return (x, y, w, h)

    def text(self, x, y, s, size=13.0, weight="normal", mono=False, anchor="middle", color="#1d1d1d"):
        family = MONO if mono else FONT
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" font-family="{family}" font-size="{size}" '
                          f'font-weight="{weight}" text-anchor="{anchor}" fill="{color}">{escape(s)}</text>')

    def arrow(self, x1, y1, x2, y2, label=None):
        self.parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#333" '
                          'stroke-width="1.5" marker-end="url(#head)"/>')
        if label:
            self.text((x1 + x2) / 2 + 6, (y1 + y2) / 2 + 4, label, size=11.5, anchor="start", color="#444")

    def render(self, height: int) -> str:
        head = ('<defs><marker id="head" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
                'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#333"/></marker></defs>')
        body = "\n".join(self.parts)
        return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {height}" width="{W}" height="{height}" '
                f'role="img" aria-label="Data flow of one training step">\n<title>One training step</title>\n'
                f'<rect width="{W}" height="{height}" fill="white"/>\n{head}\n{body}\n</svg>\n')


def draw() -> str:
    s = Svg()
    x, w = PAD, W - 2 * PAD
    cx = W / 2
    gap = 22
    y = PAD

    def below(b):
        return b[1] + b[3]

    b = s.box(x, y, w, 44, "prompts", ["P = prompts_per_step from the task"])
    s.arrow(cx, below(b), cx, below(b) + gap)
    y = below(b) + gap
    b = s.box(x, y, w, 78, "rollout: G completions per prompt",
              ["sampled from the policy at temperature \u03c4", "`response_ids, mask [B, T]`",
               "`sample_logp [B, T]` (sampler log-probs)"])
    s.arrow(cx, below(b), cx, below(b) + gap)
    y = below(b) + gap
    b = s.box(x, y, w, 44, "rewards", ["`task.score \u2192 R [B]`"])
    top = below(b)

    # three no-gradient forward passes side by side
    y = top + gap + 16
    col_w = (w - 2 * 8) / 3
    cols = [("old_logp", ["policy", "(\u03c0_old)"], "plain", False),
            ("ref_logp", ["reference", "(\u03c0_ref)"], "plain", False),
            ("old_values", ["critic", "(PPO only)"], "ppo", True)]
    xs = []
    for k, (title, lines, kind, dashed) in enumerate(cols):
        bx = x + k * (col_w + 8)
        s.box(bx, y, col_w, 62, title, lines, kind=kind, dashed=dashed)
        s.arrow(bx + col_w / 2, top, bx + col_w / 2, y, label=("no gradient", "once per step", None)[k])
        xs.append(bx + col_w / 2)
    row_bottom = y + 62
    y = row_bottom + gap
    b = s.box(x, y, w, 78, "advantages",
              ["`compute_advantages(cfg, R, mask, ...)`", "adv [B, T] (+ returns for PPO)",
               "KL in the reward here (PPO, REINFORCE++)"], kind="algo")
    for bx in xs:
        s.arrow(bx, row_bottom, bx, y)

    # the update loop
    loop_top = below(b) + gap + 6
    s.arrow(cx, below(b), cx, loop_top)
    inner = []
    iy = loop_top + 30
    steps = [("log-probs of the minibatch", ["logp, entropy (+ critic values)"], "plain"),
             ("loss", ["`compute_loss(LossInputs(...), cfg)`", "ratio, clip, KL in the loss, aggregation"], "algo"),
             ("backward", ["`loss.backward()`, clip grad norm"], "plain"),
             ("optimizer step", ["AdamW (policy; critic for PPO)"], "plain")]
    for title, lines, kind in steps:
        h = 27 + 17 * len(lines)
        ib = s.box(x + 14, iy, w - 28, h, title, lines, kind=kind)
        if inner:
            s.arrow(cx, below(inner[-1]), cx, iy)
        inner.append(ib)
        iy = below(ib) + 16
    loop_bottom = iy - 4
    s.parts.insert(0, f'<rect x="{x}" y="{loop_top}" width="{w}" height="{loop_bottom - loop_top}" rx="8" '
                      'fill="none" stroke="#3a5a8c" stroke-width="1.5" stroke-dasharray="6 4"/>')
    s.text(x + 10, loop_top + 18, "for each of ppo_epochs \u00d7 minibatches", size=12.5, weight="bold",
           anchor="start", color="#3a5a8c")
    # loop-back arrow on the right edge
    rx = x + w - 5
    s.parts.append(f'<path d="M {x + w - 14} {below(inner[-1]) - 10} L {rx} {below(inner[-1]) - 10} L {rx} '
                   f'{inner[0][1] + 12} L {x + w - 14} {inner[0][1] + 12}" fill="none" stroke="#3a5a8c" '
                   'stroke-width="1.5" marker-end="url(#head)"/>')

    y = loop_bottom + gap
    s.arrow(cx, loop_bottom, cx, y)
    b = s.box(x, y, w, 44, "metrics", ["Trainer.history, metrics.jsonl"])
    y = below(b) + 14
    # legend
    for k, (kind, label) in enumerate((("algo", "depends on the algorithm"), ("ppo", "PPO only"))):
        lx = x + k * 200
        fill, stroke = COLORS[kind]
        s.parts.append(f'<rect x="{lx}" y="{y}" width="16" height="12" rx="2" fill="{fill}" stroke="{stroke}"/>')
        s.text(lx + 22, y + 11, label, size=12, anchor="start")
    return s.render(int(y + 22))


def main(argv: list[str]) -> int:
    out = Path(__file__).with_name("training_step.svg")
    svg = draw()
    if "--check" in argv:
        return 0 if out.exists() and out.read_text() == svg else 1
    out.write_text(svg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

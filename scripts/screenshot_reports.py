#!/usr/bin/env python3
"""Open medcli's HTML pages in headless Chromium: screenshots for the docs, and the checks
tests/test_webpage.py runs (console messages, images decoded, resources fetched).

    .venv/bin/python scripts/screenshot_reports.py RUN/report.html DIR/comparison.html

writes docs/report_run.png and docs/report_comparison.png: the top of each page in a
1200 x 1800 window, at 2/3 size and in 256 colours (about 100 KB each). The pages in
the README come from a resnet18 and a vit-tiny run on the embedded PBC sample (`medcli
download --sample`), evaluated with --calibrate and explained with gradcam and rollout.

Not part of medcli (no dependency is added for it): it needs a Chromium binary on PATH
(`chromium`, `chromium-browser` or `google-chrome`; Debian: apt-get install chromium) and
Pillow for the docs images.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DOCS = Path(__file__).resolve().parents[1] / "docs"
SHOTS = {"report.html": "report_run.png", "comparison.html": "report_comparison.png"}
# Added to a copy of a page: once it has loaded (images included), each image's state, natural
# size (0 for one that does not decode) and place, each scrolling box's content and visible
# widths (a table wider than the page), and every resource the page fetched, go into a <pre>
# that --dump-dom prints.
PROBE = r"""<script>
addEventListener("load", () => {
  const images = [...document.images].map((image) => {
    const box = image.getBoundingClientRect();
    return {complete: image.complete, width: image.naturalWidth, height: image.naturalHeight,
            box: [box.left + scrollX, box.top + scrollY, box.width, box.height]};
  });
  const out = document.createElement("pre");
  out.id = "probe";
  const boxes = [...document.querySelectorAll(".wide")].map((box) => ({content: box.scrollWidth, shown: box.clientWidth}));
  const broken = [];  // words of table cells split over two lines or more (within one text node)
  for (const cell of document.querySelectorAll("td")) {
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    const range = document.createRange();
    for (let node; (node = walker.nextNode());) {
      for (const found of node.data.matchAll(/\S+/g)) {
        range.setStart(node, found.index);
        range.setEnd(node, found.index + found[0].length);
        const lines = new Set([...range.getClientRects()].map((rect) => Math.round(rect.top)));
        if (lines.size > 1) broken.push(found[0]);
      }
    }
  }
  out.textContent = JSON.stringify({images, boxes, broken,
                                    resources: performance.getEntriesByType("resource").map((e) => e.name)});
  document.body.append(out);
});
</script>"""


def browser() -> str | None:
    """The first Chromium-like browser on PATH, or None."""
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def _open(page: Path, width: int, height: int, *flags: str) -> subprocess.CompletedProcess:
    """Load `page` headless in a width x height window with a fresh profile; the page is given
    five seconds of virtual time to load. Console messages go to stderr."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [browser() or "chromium", "--headless=new", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}",
             "--hide-scrollbars", "--force-device-scale-factor=1", "--virtual-time-budget=5000",
             "--enable-logging=stderr", "--v=0", f"--window-size={width},{height}", *flags,
             Path(page).resolve().as_uri()],
            capture_output=True, text=True, timeout=90, check=True)


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 2000) -> list[str]:
    """Save the top width x height pixels of `page` to `png`; returns the page's console messages
    (errors, warnings, security-policy violations: a clean page has none)."""
    stderr = _open(page, width, height, f"--screenshot={Path(png).resolve()}").stderr
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def probe(page: Path, width: int = 1280, height: int = 2000) -> dict:
    """Load a copy of `page` with PROBE and without its content security policy (so the probe
    runs and any fetch the page would make shows up): {"images": [{complete, width, height, box:
    [x, y, w, h]}], "boxes": [{content, shown}] (widths of each `.wide` box), "broken": [words of
    table cells split over lines; a word split at a <wbr> counts only its text node's piece],
    "resources": [URLs fetched]}."""
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", Path(page).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / Path(page).name
        copy.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
        dom = _open(copy, width, height, "--dump-dom").stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    if not found:
        raise RuntimeError(f"the probe did not report from {page}")
    return json.loads(html.unescape(found.group(1)))


def docs_image(page: Path, png: Path) -> Path:
    """The top of `page` as the docs show it: a 1200 x 1800 window at 2/3 size, 256 colours."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "page.png"
        console = screenshot(page, raw, 1200, 1800)
        if console:
            raise RuntimeError(f"{page} logged {console}")
        image = Image.open(raw).convert("RGB")
        image = image.resize((image.width * 2 // 3, image.height * 2 // 3), Image.LANCZOS)
        image.quantize(256, dither=Image.Dither.NONE).save(png, optimize=True)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="+", type=Path, help="report.html and/or comparison.html pages")
    parser.add_argument("--docs", type=Path, default=DOCS, help="where the PNGs go (default: docs/)")
    args = parser.parse_args(argv)
    if browser() is None:
        print(f"no browser found ({', '.join(BROWSERS)}); install chromium", file=sys.stderr)
        return 2
    for page in args.pages:
        png = docs_image(page, args.docs / SHOTS.get(page.name, f"{page.stem}.png"))
        print(f"{png} ({png.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

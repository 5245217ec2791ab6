"""PNG screenshots and headless checks of a report with Chromium (no Python browser package needed).

``python -m xaudit.reporting.screenshot report.html out.png [--width 1200] [--height 2400]`` renders
``report.html`` in headless Chromium and saves what a reader sees (used for docs/screenshots/).
:func:`check_images` loads a report in headless Chromium and returns, per ``<img>``, whether it
decoded (``naturalWidth > 0``): the browser test of the reports uses it.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

#: browser executables looked up on PATH, first found wins
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage",
          "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio")


def find_browser() -> str | None:
    """Path of the first Chromium-like browser on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _browser(browser: str | None) -> str:
    path = browser or find_browser()
    if not path:
        raise FileNotFoundError(f"No Chromium found on PATH (looked for {', '.join(BROWSERS)}); install it "
                                "(apt-get install chromium) or pass the browser's path.")
    return path


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="xaudit-chromium-") as profile:  # a fresh profile: no locks, no state
        return subprocess.run([*cmd[:1], f"--user-data-dir={profile}", *cmd[1:]], capture_output=True, text=True,
                              timeout=timeout, check=False)


def screenshot(report: str | Path, out: str | Path, width: int = 1200, height: int = 2400,
               browser: str | None = None, timeout: float = 60.0, trim: bool = True) -> Path:
    """Render ``report`` (an HTML file) in headless Chromium at ``width`` × ``height`` and save a PNG to
    ``out``; ``trim``: crop the blank rows below the content (so a generous ``height`` costs nothing)."""
    src, dst = Path(report).resolve(), Path(out).resolve()
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist; write the report first (python audit.py ...).")
    dst.parent.mkdir(parents=True, exist_ok=True)
    proc = _run([_browser(browser), *_FLAGS, f"--screenshot={dst}", f"--window-size={int(width)},{int(height)}",
                 "--virtual-time-budget=5000", src.as_uri()], timeout)
    if not dst.is_file() or dst.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")
    if trim:
        _trim_bottom(dst)
    return dst


def _trim_bottom(path: Path, margin: int = 24) -> None:
    """Crop the blank rows below the page's content (a tall window leaves them), keeping ``margin`` px."""
    from PIL import Image, ImageChops

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    box = ImageChops.difference(
        rgb, Image.new("RGB", rgb.size, rgb.getpixel((rgb.width - 1, rgb.height - 1)))).getbbox()
    if box and box[3] + margin < rgb.height:
        rgb.crop((0, 0, rgb.width, box[3] + margin)).save(path)


#: the checker page: loads the report in an iframe, then writes one JSON line per <img> and per local link
_CHECKER = """<!doctype html><html><head><meta charset='utf-8'></head><body>
<iframe id='r' src='{src}' style='width:1200px;height:800px'></iframe><pre id='out'>PENDING</pre>
<script>
const frame = document.getElementById('r');
frame.addEventListener('load', () => {{
  const doc = frame.contentDocument;
  const wait = Array.from(doc.images).map(i => i.complete ? Promise.resolve() :
    new Promise(r => {{ i.addEventListener('load', r); i.addEventListener('error', r); }}));
  Promise.all(wait).then(() => {{
    const imgs = Array.from(doc.images).map(i => ({{src: i.getAttribute('src'), natural_width: i.naturalWidth,
                                                   natural_height: i.naturalHeight}}));
    const links = Array.from(doc.querySelectorAll('a[href]')).map(a => a.getAttribute('href'));
    document.getElementById('out').textContent = 'RESULT' + JSON.stringify({{images: imgs, links: links,
                                                                             title: doc.title}}) + 'END';
  }});
}});
</script></body></html>
"""


def check_images(report: str | Path, browser: str | None = None, timeout: float = 60.0) -> dict[str, object]:
    """Load ``report`` in headless Chromium and return ``{"images": [{src, natural_width, natural_height}],
    "links": [href], "title": str}`` as the browser saw them (an image that failed to load has
    natural_width 0). A checker page written next to the report (and removed afterwards) loads it in an
    iframe, so the report is read exactly as a reader's browser reads it from disk."""
    src = Path(report).resolve()
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist; write the report first.")
    checker = src.parent / f".xaudit_check_{src.stem}.html"
    checker.write_text(_CHECKER.format(src=html.escape(src.name, quote=True)), encoding="utf-8")
    try:
        proc = _run([_browser(browser), *_FLAGS, "--allow-file-access-from-files", "--virtual-time-budget=10000",
                     "--dump-dom", checker.as_uri()], timeout)
    finally:
        checker.unlink(missing_ok=True)
    found = re.search(r"RESULT(.*?)END", html.unescape(proc.stdout), re.S)
    if not found:
        raise RuntimeError(f"The checker page reported nothing (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(found.group(1))


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m xaudit.reporting.screenshot REPORT.html OUT.png``."""
    parser = argparse.ArgumentParser(description="Save a PNG screenshot of an xaudit report with headless Chromium.")
    parser.add_argument("report", type=Path, help="report.html to render")
    parser.add_argument("out", type=Path, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--browser", default=None, help="browser executable (default: first Chromium on PATH)")
    parser.add_argument("--no-trim", action="store_true", help="keep the blank rows below the content")
    args = parser.parse_args(argv)
    print(screenshot(args.report, args.out, args.width, args.height, args.browser, trim=not args.no_trim))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

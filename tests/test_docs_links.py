"""Every relative link and anchor in README.md and docs/*.md resolves (GitHub's heading anchors)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def _prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code blanked (links inside it are text)."""
    out, fence = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            out.append((n, re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), line) if blank_code else line))
    return out


def anchors(text: str) -> set[str]:
    """GitHub's anchors of the headings: lower case, punctuation dropped, spaces → '-', '-N' on repeats."""
    seen: dict[str, int] = {}
    for _, line in _prose_lines(text, blank_code=False):
        m = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_every_relative_link_and_anchor_resolves() -> None:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(files) > 1
    bad = []
    for f in files:
        for n, line in _prose_lines(f.read_text()):
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue
                path, _, frag = target.partition("#")
                dest = (f.parent / path) if path else f
                if not dest.exists():
                    bad.append(f"{f.relative_to(ROOT)}:{n}: no file {target}")
                elif frag and dest.suffix == ".md" and frag not in anchors(dest.read_text()):
                    bad.append(f"{f.relative_to(ROOT)}:{n}: no heading for #{frag}")
    assert not bad, "\n".join(bad)

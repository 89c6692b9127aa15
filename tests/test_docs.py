"""The README stays a README (STYLE convention 11) and every relative link of it and of docs/
leads somewhere: the file exists and, for `file.md#anchor`, so does the heading."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def prose(path):
    """The text of a Markdown file without its fenced code blocks (no links live there)."""
    return re.sub(r"^```.*?^```", "", open(path, encoding="utf-8").read(), flags=re.M | re.S)


def slug(heading):
    """GitHub's anchor of a heading: its text lower-cased, punctuation but - and _ dropped, spaces
    to hyphens (a link keeps its text, code its content)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """The anchors of a file's headings; GitHub numbers a repeated one -1, -2, ..."""
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", prose(path), re.M):
        s = slug(heading)
        found.add(f"{s}-{seen[s]}" if s in seen else s)
        seen[s] = seen.get(s, 0) + 1
    return found


def test_slug_follows_github(tmp_path):
    """Headings with code, punctuation, a link and a repeat get GitHub's anchors."""
    assert slug("How `codyra.py` works") == "how-codyrapy-works"
    assert slug("The paper's rows: protocol") == "the-papers-rows-protocol"
    assert slug("Single-task PEFT (Table 7), tiny") == "single-task-peft-table-7-tiny"
    assert slug("See [docs/speed.md](docs/speed.md)") == "see-docsspeedmd"
    page = tmp_path / "page.md"
    page.write_text("# Notes\n\n```\n# not a heading\n```\n\n## Notes\n")
    assert anchors(str(page)) == {"notes", "notes-1"}


def test_every_relative_link_resolves():
    """Each relative link of README.md and docs/*.md names an existing file, and its #anchor
    (if any) a heading of that file."""
    broken = []
    for page in PAGES:
        for target in LINK.findall(prose(page)):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not ours to check
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            where = f"{os.path.relpath(page, ROOT)}: {target}"
            if not os.path.exists(full):
                broken.append(where + " (no such file)")
            elif anchor and anchor not in anchors(full):
                broken.append(where + " (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_is_at_most_2500_words():
    """README.md holds at most 2,500 words as `wc -w` counts them, code blocks included."""
    words = len(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().split())
    assert words <= 2500, f"README.md has {words} words: move details into docs/"


def test_readme_shows_no_commit_hash():
    """README.md speaks to its users: no commit hash (`grep -nE '[0-9a-f]{7,}' README.md`)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    hashes = [(i, m) for i, line in enumerate(text.splitlines(), 1)
              for m in re.findall(r"[0-9a-f]{7,}", line)]
    assert not hashes, f"README.md (line, hash): {hashes}"

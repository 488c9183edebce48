"""The docs stay honest where a test can keep them so: every relative link resolves (to a file, and to a heading of
it), every docs/<page>.md#<anchor> that the code, the presets and the Makefile cite exists, every config key is
documented, and the README stays an entry point."""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

from tyingrun.config import SECTION_SCHEMAS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_LIMIT = 12_000

FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
# A page and anchor named in code or a preset (docs/method.md#rewards), relative to the repository root.
CITED = re.compile(r"\bdocs/([\w.-]+\.md)#([\w-]+)")


def markdown_pages() -> List[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> Iterator[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            yield line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_LINK.sub(r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> Set[str]:
    """Every heading's anchor on ``page``, repeats numbered as GitHub numbers them (-1, -2, ...)."""
    seen: Dict[str, int] = {}
    found = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(page: Path) -> Iterator[str]:
    for line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked here
                yield target


def broken(page: Path, target: str) -> str:
    """Why ``target`` (a link on ``page``) does not resolve, or "" when it does."""
    path_part, _, anchor = target.partition("#")
    destination = (page.parent / path_part).resolve() if path_part else page
    if not destination.exists():
        return f"{page.relative_to(ROOT)}: {target}: no such file"
    if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
        return f"{page.relative_to(ROOT)}: {target}: no heading #{anchor} in {destination.relative_to(ROOT)}"
    return ""


def cited_pages() -> Iterator[Tuple[Path, str, str]]:
    """(file, page, anchor) for every docs page and anchor the code, tests, presets and Makefile name."""
    files = [*ROOT.glob("tyingrun/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("conf/**/*.yaml"),
             *ROOT.glob("benchmarks/**/*.py"), ROOT / "Makefile"]
    for path in files:
        if path.resolve() == Path(__file__).resolve():
            continue
        for page, anchor in CITED.findall(path.read_text(encoding="utf-8")):
            yield path, page, anchor


def config_keys() -> List[str]:
    """``section.key`` for every field of every section's dataclass schema."""
    keys = []
    for section, schema in SECTION_SCHEMAS.items():
        assert is_dataclass(schema), f"{section}'s schema is not a dataclass"
        keys.extend(f"{section}.{field.name}" for field in fields(schema))
    return keys


def test_every_relative_link_resolves():
    problems = [problem for page in markdown_pages() for target in relative_links(page)
                if (problem := broken(page, target))]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_links_checked_include_files_and_anchors():
    targets = [target for page in markdown_pages() for target in relative_links(page)]
    assert any(target.startswith("docs/") and "#" in target for target in targets)
    assert any(target.startswith("#") for target in targets)


def test_a_missing_file_or_heading_is_reported():
    page = DOCS / "method.md"
    assert broken(page, "no-such-page.md").endswith("no such file")
    assert "no heading #no-such-heading" in broken(page, "method.md#no-such-heading")
    assert broken(page, "method.md#tying-maps") == ""
    assert broken(page, "../README.md#code-map") == ""


def test_slugs_follow_github():
    assert slug("Differences from the authors' code") == "differences-from-the-authors-code"
    assert slug("What `make demo` prints and leaves") == "what-make-demo-prints-and-leaves"
    assert slug("summary.json") == "summaryjson"
    assert slug("Weights & Biases") == "weights--biases"
    assert slug("dynamic_q") == "dynamic_q"
    assert slug("See [the method](method.md)") == "see-the-method"


def test_every_docs_anchor_the_code_cites_exists():
    cited = list(cited_pages())
    assert len(cited) > 10, "the code cites docs/method.md#... in many places; the pattern found too few"
    problems = [f"{path.relative_to(ROOT)}: docs/{page}#{anchor}" for path, page, anchor in cited
                if broken(DOCS / "method.md", f"{page}#{anchor}")]
    assert not problems, "cited docs anchors that do not exist:\n" + "\n".join(problems)


def test_every_config_key_is_documented():
    text = "\n".join(page.read_text(encoding="utf-8") for page in markdown_pages())
    keys = config_keys()
    assert "policy.reward" in keys and "train.max_steps" in keys and "hardware.fsdp" in keys
    missing = [key for key in keys if not re.search("`" + re.escape(key) + r"(?![\w.])[^`\n]*`", text)]
    assert not missing, ("config keys documented nowhere in README.md or docs/*.md (write them as `section.key` "
                         "on the page that explains the section): " + ", ".join(missing))


def test_readme_is_an_entry_point():
    text = README.read_text(encoding="utf-8")
    assert len(text) <= README_LIMIT, f"README.md has {len(text):,} characters; keep it to {README_LIMIT:,}"
    assert "docs/architecture.md" in text and "## Code map" in text

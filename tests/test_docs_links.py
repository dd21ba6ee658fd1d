"""Every link and file reference in README.md and docs/*.md resolves in a clone of the
repository: relative links ``[text](path#anchor)`` to files and headings, and paths in
backticks (``kfac_mn/fisher/blocks.py``, ``tests/mpi/...``) to files or folders."""
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\s]+)`")
#: the folders a backticked path must start with to be taken for a file of ours
TOP = ("kfac_mn/", "utils/", "models/", "scripts/", "tests/", "configs/", "docs/")


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    return {slug(line.lstrip("#")) for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")}


def references(path):
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # commands, not references
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target):
            yield "link", target
    for target in CODE.findall(text):
        if target.startswith(TOP) and "*" not in target and "<" not in target:
            yield "file", target.split(":")[0]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_link_and_file_reference_resolves(document):
    broken = []
    for kind, target in references(document):
        if kind == "link":
            file_part, _, anchor = target.partition("#")
            resolved = (document.parent / file_part).resolve() if file_part else document
            if not resolved.exists():
                broken.append(f"link {target}: no {resolved.relative_to(REPO)}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"link {target}: no heading #{anchor} in {resolved.name}")
            elif REPO not in resolved.parents and resolved != REPO:
                broken.append(f"link {target}: outside the repository")
        elif not (REPO / target).exists():
            broken.append(f"file reference `{target}`: no such file or folder")
    assert not broken, f"{document.relative_to(REPO)}:\n  " + "\n  ".join(broken)


def test_nothing_points_outside_the_repository():
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
                 *sorted(REPO.glob("kfac_mn/**/*.py")), *sorted(REPO.glob("utils/**/*.py")),
                 *sorted(REPO.glob("scripts/*.py"))]:
        text = path.read_text(encoding="utf-8")
        assert "PAPER.md" not in text and "../shared" not in text, path

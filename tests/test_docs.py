"""The repository stands alone: no file refers to documents outside it, and every relative link
and `docs/...` path in it resolves."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Documents of the team's own workspace that users who clone the repository do not have (split
# so that this file does not name them).
OUTSIDE = ("../" + "shared", "SPEC" + ".md", "CPU_" + "NOTES", "DESIGN" + ".md",
           "CONVENTIONS" + ".md")


def tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in names:
        path = ROOT / name
        if path.suffix in {".py", ".md", ".sh", ".toml", ".cpp", ".h", ".cu", ".txt", ""} \
                and path.is_file():
            yield path


def test_no_file_refers_to_documents_outside_the_repository():
    offending = [f"{path.relative_to(ROOT)}: {word}" for path in tracked_text_files()
                 for word in OUTSIDE if word in path.read_text(encoding="utf-8", errors="replace")]
    assert offending == []


def test_relative_markdown_links_resolve():
    broken = []
    for path in ROOT.glob("**/*.md"):
        if ".git" in path.parts:
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_docs_paths_named_anywhere_exist():
    missing = sorted({f"{path.relative_to(ROOT)}: {name}" for path in tracked_text_files()
                      for name in re.findall(r"\bdocs/[\w./-]+\.(?:md|json|png)",
                                             path.read_text(encoding="utf-8", errors="replace"))
                      if not (ROOT / name).exists()})
    assert missing == []

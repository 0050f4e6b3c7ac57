"""The recovery-training corpus: English technical text of a Debian system, and two held-out texts.

  train    the pydoc topics at even positions (accuracy.py's calibration half), Debian man pages
           (sections 1, 5, 7 and 8, rendered to plain text by groff), package documentation under
           /usr/share/doc (README, FAQ, *.txt and *.md; no changelogs, no copyright files), the GNU
           info manuals (their nodes in order, without menus) and the long descriptions of the
           installed Python distributions (their READMEs), each document whole (long ones cut at a
           paragraph), in a seeded shuffled order;
  heldout  "pydoc": the pydoc topics at odd positions; "english": Vim's user manual (usr_*.txt), a
           tutorial in English prose that is not Python documentation. Vim's own man pages and
           documentation are left out of train, so neither held-out text is ever trained on.
Written as one JSON file, so that a machine without these packages (the GPU machine) trains and
evaluates on exactly the text built here.

    python3 -m benchmarks.corpus benchmarks/corpus.json            # ~4 MB
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import shutil
import subprocess
from pathlib import Path

MAN_SECTIONS = ("man1", "man5", "man7", "man8")
# Each source's share of the training text; a source with less text gives what it has.
SHARES = {"man": 0.45, "doc": 0.3, "info": 0.15, "python": 0.1}
INFO_MENU_ENTRY = re.compile(r"^\* (Menu:|.*::)")
DOC_NAMES = re.compile(r"^(README|FAQ)|\.(txt|md)$", re.IGNORECASE)
# Held out: vim's user manual, so vim's pages and docs stay out of the training text.
HELD_OUT_PACKAGES = re.compile(r"^(vim|gvim|rvim|vimdiff|vimtutor|view|ex|vi|xxd)\b")
MAX_DOCUMENT = 24_000  # characters: no single page or README dominates
MIN_DOCUMENT = 600
# Man pages per command family (the name up to its first - _ or .; gcloud alone ships 16,000), and
# documents per package (git ships hundreds of release notes).
PAGES_PER_FAMILY = 8


def _read(path: Path) -> str:
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", "replace")


def _clean(text: str) -> str:
    """Lines stripped, runs of blank lines made one, cut to MAX_DOCUMENT at a paragraph."""
    text = re.sub(r"\n\s*\n+", "\n\n", "\n".join(line.strip() for line in text.splitlines())).strip()
    if len(text) > MAX_DOCUMENT:
        cut = text.rfind("\n\n", 0, MAX_DOCUMENT)
        text = text[: cut if cut > MAX_DOCUMENT // 2 else MAX_DOCUMENT]
    return text


def render_man_page(path: Path) -> str:
    """A man page as plain text: groff without hyphenation, one line per paragraph, the page's
    header and footer lines dropped."""
    rendered = subprocess.run(["groff", "-mandoc", "-Tutf8", "-P-cbou", "-rLL=4000n", "-rHY=0"],
                              input=_read(path).encode(), capture_output=True, timeout=60).stdout
    lines = rendered.decode("utf-8", "replace").strip().splitlines()
    return _clean("\n".join(lines[1:-1]))


def man_pages(root: Path = Path("/usr/share/man"), seed: int = 0) -> list[Path]:
    """The English man pages of MAN_SECTIONS, at most PAGES_PER_FAMILY of each command family (drawn
    at random), without the held-out package's."""
    families: dict[str, list[Path]] = {}
    for path in sorted(path for section in MAN_SECTIONS for path in (root / section).glob("*")):
        if not HELD_OUT_PACKAGES.match(path.name):
            families.setdefault(re.split(r"[-_.]", path.name)[0], []).append(path)
    rng = random.Random(seed)
    return sorted(path for pages in families.values() for path in rng.sample(pages, min(len(pages), PAGES_PER_FAMILY)))


def package_docs(root: Path = Path("/usr/share/doc"), seed: int = 0) -> list[Path]:
    """README, FAQ, *.txt and *.md files of /usr/share/doc, at most PAGES_PER_FAMILY a package (drawn
    at random), without the held-out package's."""
    rng = random.Random(seed)
    found = []
    for package in sorted(root.iterdir()):
        if package.is_dir() and not HELD_OUT_PACKAGES.match(package.name):
            docs = sorted(path for path in package.rglob("*")
                          if path.is_file() and DOC_NAMES.search(path.name.removesuffix(".gz")))
            found += rng.sample(docs, min(len(docs), PAGES_PER_FAMILY))
    return found


def info_manuals(root: Path = Path("/usr/share/info")) -> list[Path]:
    """The GNU info manuals' files (a manual split in parts has several), without the held-out package's."""
    return sorted(path for path in root.glob("*.info*") if not HELD_OUT_PACKAGES.match(path.name))


def info_documents(path: Path) -> list[str]:
    """An info file's nodes as plain text, consecutive nodes joined up to MAX_DOCUMENT characters:
    each node's header line, the menus and the tag table dropped."""
    documents, current = [], ""
    for node in _read(path).split("\x1f")[1:]:
        lines = node.strip("\n").splitlines()
        if not lines or not lines[0].startswith("File:"):  # the tag table, an indirect file list
            continue
        text = _clean("\n".join(line for line in lines[1:] if not INFO_MENU_ENTRY.match(line)))
        if current and len(current) + len(text) > MAX_DOCUMENT:
            documents.append(current)
            current = ""
        current = f"{current}\n\n{text}" if current else text
    return [_clean(document) for document in [*documents, current] if document]


def python_descriptions() -> list[str]:
    """The long descriptions (the README) of the installed Python distributions, one a distribution."""
    import importlib.metadata

    found = {}
    for distribution in importlib.metadata.distributions():
        metadata = distribution.read_text("METADATA") or ""
        _, _, body = metadata.partition("\n\n")
        name = distribution.metadata["Name"] or ""
        if body.strip() and not HELD_OUT_PACKAGES.match(name.lower()):
            found.setdefault(name.lower(), _clean(body))
    return [found[name] for name in sorted(found)]


def vim_user_manual(characters: int = 80_000) -> str:
    """The first usr_*.txt chapters of Vim's user manual, at least `characters` long."""
    found = sorted(Path("/usr/share/vim").glob("vim*/doc/usr_[0-9]*.txt"))
    if not found:
        raise SystemExit("Vim's user manual is not installed (/usr/share/vim/vim*/doc/usr_*.txt): "
                         "apt-get install vim-runtime")
    text = ""
    for path in found:
        text += ("\n\n" if text else "") + path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= characters:
            break
    return text


def build(path: Path, megabytes: float = 4.0, seed: int = 0) -> dict:
    """Assemble the corpus and write it to `path` as JSON; returns what it wrote."""
    from benchmarks.accuracy import pydoc_split

    if shutil.which("groff") is None:
        raise SystemExit("groff renders the man pages: apt-get install groff-base")
    pydoc_train, pydoc_heldout = pydoc_split()
    english = vim_user_manual()
    budget = int(megabytes * 2**20) - len(pydoc_train)
    rng = random.Random(seed)
    documents, sources = [pydoc_train], {"pydoc": 1, **dict.fromkeys(SHARES, 0)}
    # each source: its items, and what an item reads as (a list of documents)
    candidates = {"man": (man_pages(seed=seed), lambda path: [render_man_page(path)]),
                  "doc": (package_docs(seed=seed), lambda path: [_clean(_read(path))]),
                  "info": (info_manuals(), info_documents),
                  "python": (python_descriptions(), lambda text: [text])}
    seen: set[str] = set()
    for source, (items, read) in candidates.items():
        rng.shuffle(items)
        size = 0
        for item in items:
            if size >= SHARES[source] * budget:
                break
            try:
                texts = read(item)
            except (OSError, subprocess.SubprocessError):
                continue
            for text in texts:
                # text in several packages (a license every GNU manual appends) is taken once
                if len(text) >= MIN_DOCUMENT and text not in english and text not in pydoc_heldout and text not in seen:
                    seen.add(text)
                    documents.append(text)
                    sources[source] += 1
                    size += len(text)
    rng.shuffle(documents)
    corpus = {"train": documents, "heldout": {"pydoc": pydoc_heldout, "english": english}, "documents": sources}
    path.write_text(json.dumps(corpus))
    return corpus


def load(path: Path) -> dict:
    corpus = json.loads(Path(path).read_text())
    if set(corpus) < {"train", "heldout"}:
        raise ValueError(f"{path} is not a corpus written by benchmarks/corpus.py")
    return corpus


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    parser.add_argument("--megabytes", type=float, default=4.0, help="size of the training text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    corpus = build(args.path, args.megabytes, seed=args.seed)
    train = sum(len(d) for d in corpus["train"])
    print(f"{args.path}: train {train / 2**20:.2f} MB in {len(corpus['train'])} documents {corpus['documents']}; "
          f"held out: pydoc {len(corpus['heldout']['pydoc']) / 1e3:.0f} kB, "
          f"english {len(corpus['heldout']['english']) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()

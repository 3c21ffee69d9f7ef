"""Build the offline training corpus: Python stdlib source, CPython docs (reST), English man pages.

Everything comes from Debian packages present on the machine (libpython3.11-stdlib, python3.11-doc, man-db
plus installed manuals), so the recipe is reproducible offline. Documents are sorted by path and split into
train / held-out by a hash of the path, so the split is stable across runs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class CorpusConfig:
    stdlib_dir: str = "/usr/lib/python3.11"                    # Debian libpython3.11-stdlib
    docs_dir: str = "/usr/share/doc/python3.11/html/_sources"  # Debian python3.11-doc (reST sources)
    man_dirs: tuple[str, ...] = ("/usr/share/man/man1", "/usr/share/man/man5", "/usr/share/man/man7", "/usr/share/man/man8")
    max_man_pages: int = 2500                                  # rendering costs ~0.1 s a page
    heldout_percent: int = 3                                   # share of documents held out, by path hash
    max_doc_chars: int = 200_000                               # longer documents are cut


def _bucket(path: str) -> int:
    return int(hashlib.sha1(path.encode()).hexdigest()[:8], 16) % 100


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _render_man(path: Path) -> str:
    out = subprocess.run(["man", "--nj", "--nh", "-E", "UTF-8", "-l", str(path)], capture_output=True,
                         env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, timeout=30)
    col = subprocess.run(["col", "-bx"], input=out.stdout, capture_output=True, timeout=30)
    return col.stdout.decode("utf-8", errors="replace")


def iter_sources(cfg: CorpusConfig) -> list[tuple[str, Path]]:
    """(domain, path) for every document, in a stable order."""
    code = sorted(p for p in Path(cfg.stdlib_dir).rglob("*.py") if "site-packages" not in p.parts)
    docs = sorted(Path(cfg.docs_dir).rglob("*.txt"))
    man = sorted(p for d in cfg.man_dirs for p in Path(d).glob("*") if p.is_file() and not p.is_symlink())
    man = sorted(man, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())[: cfg.max_man_pages]
    return [("code", p) for p in code] + [("docs", p) for p in docs] + [("man", p) for p in sorted(man)]


def build_corpus(cfg: CorpusConfig, out_dir: Path) -> dict:
    """Write train.jsonl / heldout.jsonl ({"domain", "path", "text"}) and a manifest with sizes and hashes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = iter_sources(cfg)
    stats: dict = {"train": {}, "heldout": {}}
    digest = hashlib.sha256()
    with open(out_dir / "train.jsonl", "w") as tr, open(out_dir / "heldout.jsonl", "w") as ho:
        for domain, path in tqdm(sources, desc="corpus", unit="doc"):
            text = _render_man(path) if domain == "man" else _read(path)
            text = text[: cfg.max_doc_chars].strip()
            if len(text) < 200:
                continue
            split = "heldout" if _bucket(str(path)) < cfg.heldout_percent else "train"
            (ho if split == "heldout" else tr).write(json.dumps({"domain": domain, "path": str(path), "text": text}) + "\n")
            s = stats[split].setdefault(domain, {"docs": 0, "chars": 0})
            s["docs"] += 1
            s["chars"] += len(text)
            digest.update(path.name.encode() + hashlib.sha256(text.encode()).digest())
    manifest = {"config": cfg.__dict__, "stats": stats, "sha256": digest.hexdigest()}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=list))
    return manifest

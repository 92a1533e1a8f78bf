"""Corpus loading: local UTF-8 files, or a named public corpus downloaded once into a cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from app.vocab import normalize

NAMED_CORPORA: dict[str, str] = {
    "shakespeare": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "nietzsche": "https://s3.amazonaws.com/text-datasets/nietzsche.txt",
}


class CorpusError(ValueError):
    """A corpus that cannot be read."""


@dataclass(frozen=True)
class Corpus:
    name: str
    files: list[str]
    text: str  # after optional lowercasing, then normalisation
    sha256: str  # of the raw bytes of all files, in order
    lowercase: bool
    normalization: str | None = None  # NFC, NFKC (app.vocab.normalize) or None


def default_cache_dir() -> Path:
    if os.environ.get("CHARLSTM_CACHE"):
        return Path(os.environ["CHARLSTM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "charlstm"


def download(name: str, cache_dir: Path) -> Path:
    """Fetch a named corpus once, as keras.utils.get_file does: later calls reuse the file."""
    url = NAMED_CORPORA[name]
    target = cache_dir / "datasets" / f"{name}.txt"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download to a temporary file first so an interrupted transfer never looks complete.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise CorpusError(f"could not download corpus {name!r} from {url}: {exc}") from exc
    return target


def resolve(sources: list[str], cache_dir: Path | None = None) -> tuple[str, list[Path]]:
    """Map CLI corpus arguments to (corpus name, files). A single known name is downloaded."""
    if len(sources) == 1 and sources[0] in NAMED_CORPORA and not Path(sources[0]).exists():
        name = sources[0]
        return name, [download(name, cache_dir or default_cache_dir())]
    paths = [Path(s) for s in sources]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        known = ", ".join(sorted(NAMED_CORPORA))
        raise CorpusError(
            f"corpus file(s) not found: {', '.join(missing)} (named corpora: {known})")
    name = paths[0].stem if len(paths) == 1 else "+".join(p.stem for p in paths)
    return name, paths


def load(sources: list[str], lowercase: bool = False, cache_dir: Path | None = None,
         normalization: str | None = None) -> Corpus:
    """The text of `sources`, each file decoded as UTF-8 without its byte-order mark (editors
    on Windows write one; as text it would be the character U+FEFF at each file's start, a
    vocabulary entry for nothing), then lowercased and normalised if asked."""
    name, paths = resolve(sources, cache_dir)
    digest = hashlib.sha256()
    parts: list[str] = []
    for path in paths:
        raw = path.read_bytes()
        digest.update(raw)
        try:
            parts.append(raw.decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{path}: not UTF-8 text ({exc})") from exc
    text = "".join(parts)
    if lowercase:
        text = text.lower()
    text = normalize(text, normalization)
    if len(text) < 2:
        raise CorpusError(f"corpus {name!r} has {len(text)} characters; need at least 2")
    return Corpus(name, [str(p) for p in paths], text, digest.hexdigest(), lowercase,
                  normalization)


def sources_for(name: str, files: list[str]) -> list[str]:
    """Where to re-read a model's corpus: its files if present, else its name if a named one."""
    if files and all(Path(f).is_file() for f in files):
        return files
    if name in NAMED_CORPORA:
        return [name]
    raise CorpusError(
        f"the corpus files this model was trained on are not here ({', '.join(files)}); "
        "pass the text file(s) explicitly"
    )

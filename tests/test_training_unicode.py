"""Training on any UTF-8 text: a byte-order mark is not a character, the vocabulary is reported
and characters only the validation split holds are named, samples reach the terminal escaped,
and `--normalize` is recorded in model.json and applied to seeds and stops at serve time.
One short run of the real CLI (train, then export in its own process) for all of it."""

from __future__ import annotations

import subprocess
import unicodedata
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.artifact import read_metadata
from app.main import create_app
from app.settings import Settings
from app.vocab import Vocabulary, normalize
from tests.conftest import ROOT, run_cli
from training.display import for_terminal, name_chars
from training.train import report_vocabulary

# Decomposed Vietnamese ("ế" is e + U+0302 + U+0301), ESC and BEL in the training text; the
# validation split (the last tenth) adds Cyrillic letters and a NUL that training never sees.
TRAIN_TEXT = unicodedata.normalize("NFD", "Tiếng Việt có dấu.\x1b\x07 Tiến lên!\r\n") * 100
VAL_TEXT = unicodedata.normalize("NFD", "Tiến lên, Tiếng Việt có dấu: жук\x00 фея.\r\n") * 9
NFC_TEXT = unicodedata.normalize("NFC", TRAIN_TEXT + VAL_TEXT)
CUT = int(len(NFC_TEXT) * 0.9)  # the default --val-fraction 0.1
VAL_ONLY = set(NFC_TEXT[CUT:]) - set(NFC_TEXT[:CUT])
PRECOMPOSED = "Tiế"  # U+1EBF, as a keyboard types it


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("utrain")
    corpus = root / "vi.txt"
    corpus.write_bytes(b"\xef\xbb\xbf" + (TRAIN_TEXT + VAL_TEXT).encode())
    assert set("жукфя\x00") <= VAL_ONLY
    res = run_cli("training", "train", str(corpus), "-o", str(root / "run"), "--name", "vi",
                  "--models-dir", str(root / "models"), "--normalize", "NFC", "--units", "8",
                  "--embedding-dim", "4", "--layers", "1", "--seq-len", "20",
                  "--sample-length", "40", "--epochs", "1", "--steps-per-epoch", "2", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "models", res


@pytest.mark.slow  # TensorFlow
def test_a_byte_order_mark_is_not_in_the_vocabulary(
        trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    meta = read_metadata(trained[0] / "vi")
    assert "\ufeff" not in meta.vocab
    assert meta.corpus.characters == len(NFC_TEXT)


@pytest.mark.slow  # TensorFlow
def test_normalisation_is_recorded_and_applied_to_the_corpus(
        trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    meta = read_metadata(trained[0] / "vi")
    assert meta.normalization == "NFC"
    assert "ế" in meta.vocab
    assert "\u0301" not in meta.vocab
    assert read_metadata(ROOT / "models" / "shakespeare").normalization is None  # older files


@pytest.mark.slow  # TensorFlow
def test_training_reports_the_vocabulary_and_validation_only_characters(
        trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    _, res = trained
    size = len(read_metadata(trained[0] / "vi").vocab)
    assert f"vocabulary: {size} characters" in res.stdout
    warning = next(line for line in res.stderr.splitlines()
                   if "occur only in the validation split" in line)
    assert warning.startswith(f"warning: {len(VAL_ONLY)} of {size} characters")
    for char in "жук":
        assert f"U+{ord(char):04X} '{char}'" in warning
    assert "U+0000 '\\x00'" in warning


@pytest.mark.slow  # TensorFlow
def test_samples_reach_the_terminal_with_controls_escaped(
        trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    _, res = trained
    assert "--- temperature 1.0" in res.stdout
    for raw in ("\x1b", "\x07", "\x00"):
        assert raw not in res.stdout
        assert raw not in res.stderr
    assert "\\x1b" in res.stdout or "\\x07" in res.stdout  # the training text holds both


@pytest.mark.slow  # TensorFlow
def test_the_service_applies_the_models_normalisation_to_seeds_and_stops(
        trained: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    app = create_app(Settings(models_dir=trained[0], default_model="vi"))
    with TestClient(app) as client:
        for seed in (PRECOMPOSED, unicodedata.normalize("NFD", PRECOMPOSED)):
            r = client.post("/generate", json={"seed_text": seed, "max_new_chars": 5})
            assert r.status_code == 200, r.text
            assert r.json()["seed_text"] == PRECOMPOSED
        # A stop typed decomposed is the model's precomposed character: it stops the text.
        r = client.post("/generate", json={"seed_text": "T", "max_new_chars": 2000, "seed": 1,
                                           "temperature": 1.5, "stop": ["e\u0302\u0301"]})
        assert r.status_code == 200, r.text
        assert r.json()["finish_reason"] == "stop"
        assert "ế" not in r.json()["text"]


def test_normalize_forms() -> None:
    assert normalize("e\u0302\u0301", "NFC") == "ế"
    assert normalize("ﬁ", "NFKC") == "fi"
    assert normalize("e\u0302\u0301", None) == "e\u0302\u0301"
    with pytest.raises(ValueError, match="NFD"):
        normalize("x", "NFD")


def test_for_terminal_escapes_controls_but_keeps_text() -> None:
    text = "a\tb\nç中😀\u200d👩 \x1b[31m\x07\x00\r\x85\u2028\u202e\x7f"
    assert for_terminal(text) == ("a\tb\nç中😀\u200d👩 \\x1b[31m\\x07\\x00\\r\\x85\\u2028"
                                  "\\u202e\\x7f")
    assert name_chars(list("ab\x1b"), limit=2) == "U+0061 'a', U+0062 'b' and 1 more"


def test_report_vocabulary_orders_validation_only_characters_by_count(
        capsys: pytest.CaptureFixture[str]) -> None:
    vocab = Vocabulary(list("abxy"))
    unseen = report_vocabulary(vocab, vocab.encode("abab"), vocab.encode("axyy"))
    assert unseen == ["y", "x"]
    out = capsys.readouterr()
    assert "vocabulary: 4 characters" in out.out
    assert "warning: 2 of 4 characters occur only in the validation split (3 of its 4" in out.err
    assert report_vocabulary(vocab, vocab.encode("abxy"), vocab.encode("ab")) == []
    assert "warning" not in capsys.readouterr().err


def test_lowercase_then_normalise_at_serve_time(tmp_path: Path) -> None:
    """A model built without training (tests/modelgen.py) recording both: the seed is
    lowercased, then normalised, as training prepared the corpus; refusals still name what
    was sent."""
    from tests.modelgen import build_model

    build_model(tmp_path, "m", list("abcdeế \n"), decode_steps=(), lowercase=True,
                normalization="NFC")
    app = create_app(Settings(models_dir=tmp_path, default_model="m"))
    with TestClient(app) as client:
        for seed, lowercased in (("AbE\u0302\u0301", True), ("abế", False),
                                 ("abe\u0302\u0301", False)):
            r = client.post("/generate", json={"seed_text": seed, "max_new_chars": 3})
            assert r.status_code == 200, r.text
            assert r.json()["seed_text"] == "abế"
            assert r.json()["lowercased"] is lowercased
        r = client.post("/generate", json={"seed_text": "abz", "max_new_chars": 3})
        assert r.status_code == 422
        assert "'z'" in r.text

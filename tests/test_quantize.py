"""The int8 CPU variant: written by `python -m training quantize`, listed only when its
validation loss is within the bound of the fp32 graph's, loaded by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.artifact import ArtifactError, read_metadata
from app.runtime import RuntimeOptions, batch_invariant, load_model, serving_variant
from tests.conftest import run_cli


@pytest.fixture
def tiny_copy(tiny_models: Path, tmp_path: Path) -> Path:
    """A private copy: the session's tiny model is shared by other tests."""
    return Path(shutil.copytree(tiny_models / "tiny", tmp_path / "tiny"))


@pytest.mark.slow  # quantizes with the CLI
def test_int8_variant_is_listed_with_its_loss_within_the_bound(tiny_copy: Path,
                                                               small_corpus: Path) -> None:
    res = run_cli("training", "quantize", str(tiny_copy), str(small_corpus))
    assert res.returncode == 0, res.stderr[-3000:]

    meta = read_metadata(tiny_copy)
    (variant,) = meta.variants
    assert variant.name == "int8"
    assert (tiny_copy / variant.file).is_file()
    check = variant.validation
    assert check.max_increase_nats == 0.01
    assert check.loss_nats <= check.reference_loss_nats + 0.01
    # The reference is the fp32 graph on export's own validation windows.
    assert meta.validation is not None
    assert check.reference_loss_nats == pytest.approx(meta.validation.loss_nats, abs=1e-4)
    assert check.window == meta.validation.window
    # model.json replaced in one rename (the folder may be served): no temporary left, readable
    # by a service running as another user.
    assert not [p.name for p in tiny_copy.iterdir() if p.name.startswith(".")]
    assert (tiny_copy / "model.json").stat().st_mode & 0o777 == 0o644

    fp32 = load_model(tiny_copy, RuntimeOptions(device="cpu"))
    int8 = load_model(tiny_copy, RuntimeOptions(device="cpu"), variant="int8")
    assert int8.graph_file == "model.int8.onnx"
    ids = np.random.default_rng(0).integers(0, len(fp32.vocab), (4, 30)).astype(np.int32)
    zeros = [np.zeros((4, n), np.float32) for n in fp32.state_sizes]
    a, _ = fp32.run_numpy(ids, zeros)
    b, _ = int8.run_numpy(ids, zeros)
    assert not np.array_equal(a, b)  # really another graph
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.9
    # Dynamic quantization takes the activations' scale over the whole batch: measured and
    # recorded, so `auto` does not serve it (seeded text must not change with load).
    assert batch_invariant(fp32)
    assert not batch_invariant(int8)
    assert variant.batch_invariant is False
    assert "seeded generations then vary with load" in res.stdout
    assert serving_variant(meta, "cpu", "auto") is None


@pytest.mark.slow  # quantizes with the CLI
def test_int8_variant_over_the_bound_is_refused_and_nothing_written(tiny_copy: Path,
                                                                     small_corpus: Path) -> None:
    before = (tiny_copy / "model.json").read_text()
    files = sorted(p.name for p in tiny_copy.iterdir())
    # A negative bound asks int8 to beat fp32 by a whole nat: it cannot.
    res = run_cli("training", "quantize", str(tiny_copy), str(small_corpus),
                  "--max-increase", "-1")
    assert res.returncode == 2
    assert "not written" in res.stderr
    assert (tiny_copy / "model.json").read_text() == before
    assert sorted(p.name for p in tiny_copy.iterdir()) == files  # no int8 graph, no leftovers
    assert "model.int8.onnx" not in files


def test_int8_is_scored_on_the_models_own_split_by_default(tiny_copy: Path,
                                                           small_corpus: Path) -> None:
    """Like `evaluate`, quantize reads the validation fraction from model.json (not a fixed 0.1)."""
    from training.evaluate import evaluate_cli
    from training.quantize import quantize_int8

    raw = json.loads((tiny_copy / "model.json").read_text())
    raw["validation"]["fraction"] = 0.2  # as if trained with --val-fraction 0.2
    (tiny_copy / "model.json").write_text(json.dumps(raw))
    variant = quantize_int8(tiny_copy, [small_corpus])
    fp32 = evaluate_cli(tiny_copy, [small_corpus], None, None)[0].score  # training windows
    assert variant.validation.characters == fp32.characters
    assert variant.validation.reference_loss_nats == pytest.approx(fp32.loss_nats, abs=1e-5)
    ten_percent = evaluate_cli(tiny_copy, [small_corpus], 0.1, None)[0].score
    assert variant.validation.characters != ten_percent.characters


def test_unknown_variant_names_the_listed_ones(tiny_copy: Path) -> None:
    with pytest.raises(ArtifactError, match=r"no 'int4' variant \(listed: none\)"):
        load_model(tiny_copy, RuntimeOptions(device="cpu"), variant="int4")


def test_model_json_without_the_new_sections_still_loads(tiny_copy: Path) -> None:
    raw = json.loads((tiny_copy / "model.json").read_text())
    for key in ("variants", "decode_graphs"):
        raw.pop(key, None)
    (tiny_copy / "model.json").write_text(json.dumps(raw))
    meta = read_metadata(tiny_copy)
    assert meta.variants == []
    assert meta.decode_graphs == []
    assert load_model(tiny_copy, RuntimeOptions(device="cpu")).graph_file == "model.onnx"


def test_requantizing_drops_decode_graphs_built_from_the_old_int8_file(
        tiny_copy: Path, small_corpus: Path) -> None:
    from training.decode_artifact import add_decode_graphs
    from training.quantize import quantize_int8

    quantize_int8(tiny_copy, [small_corpus])
    add_decode_graphs(tiny_copy, (1,), variant="int8")
    assert (tiny_copy / "decode.int8.k1.onnx").is_file()
    quantize_int8(tiny_copy, [small_corpus])
    meta = read_metadata(tiny_copy)
    assert [d.source for d in meta.decode_graphs] == ["model.onnx", "model.onnx"]
    assert not (tiny_copy / "decode.int8.k1.onnx").exists()
    assert [v.name for v in meta.variants] == ["int8"]

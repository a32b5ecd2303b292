"""Bundles: what is exported agrees with torch, and damaged bundles are refused with the reason."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engines.bundle import load_bundle
from engines.deployed_model import load_deployed
from flowsort.errors import UserError
from trainer.predictions import predict
from trainer.synthetic import generate


@pytest.fixture()
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def test_manifest_records_what_the_runtime_needs(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    manifest = bundle.manifest
    assert bundle.class_names == ("G1", "S_phase", "G2", "Prophase", "Metaphase", "Anaphase", "Telophase")
    assert bundle.channels == (3, 6) and bundle.channel_names == ("brightfield", "darkfield")
    assert manifest["input"] == {"name": "cells", "dtype": "uint16", "layout": "NCHW", "size": 40}
    assert len(manifest["normalization"]["mean"]) == 2 and manifest["temperature"] > 0
    assert manifest["dead_cell_detector"]["threshold_from"] == "labels"
    provenance = manifest["provenance"]
    assert len(provenance["dataset_hash"]) == 64 and provenance["seed"] == 3
    assert {"flowsort_version", "git_commit", "created"} <= set(provenance)
    images, labels = bundle.validation_cells()
    assert images.dtype == np.uint16 and len(images) == len(labels) == provenance["n_validation"]
    counts = provenance["train_class_counts"]
    assert list(counts) == list(bundle.class_names) and sum(counts.values()) == provenance["n_train"]
    np.testing.assert_allclose(bundle.class_prior, np.array(list(counts.values())) / provenance["n_train"])


def test_onnx_agrees_with_torch_on_fresh_random_inputs(tiny_bundle: Path) -> None:
    ov = pytest.importorskip("openvino", reason="the ONNX check runs the graph with OpenVINO (extra 'cpu')")
    bundle = load_bundle(tiny_bundle)
    rng = np.random.default_rng(2024)
    cells = rng.integers(0, 4096, (37, 2, 40, 40), dtype=np.uint16)
    cells[:20] = generate(20, seed=77, size=40).images  # and some that look like cells
    compiled = ov.Core().compile_model(str(bundle.onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(cells)
    onnx_out = [result[compiled.output(name)] for name in ("probabilities", "embedding", "dead_score")]
    torch_out = predict(load_deployed(bundle), cells)
    np.testing.assert_allclose(onnx_out[0], torch_out.probabilities, atol=1e-4)
    np.testing.assert_allclose(onnx_out[1], torch_out.embedding, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(onnx_out[2], torch_out.dead_score, rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(torch_out.probabilities.sum(axis=1), 1, atol=1e-5)


def test_dead_score_separates_synthetic_dead_cells_and_debris(tiny_bundle: Path) -> None:
    from sklearn.metrics import roc_auc_score

    cells = generate(1200, seed=4242, size=40, prior="uniform", dead_fraction=0.15, debris_fraction=0.1)
    scores = predict(load_deployed(load_bundle(tiny_bundle)), cells.images).dead_score
    abnormal = cells.dead | cells.debris
    # A seconds-trained width-0.25 model; the full demo model reaches an AUROC above 0.99 (docs/benchmarks.md).
    assert roc_auc_score(abnormal, scores) > 0.8
    threshold = load_bundle(tiny_bundle).dead_threshold
    flagged_dead, flagged_live = (scores[abnormal] > threshold).mean(), (scores[~abnormal] > threshold).mean()
    assert flagged_dead - flagged_live > 0.4  # the threshold chosen from the dead/debris labels separates them


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes()[:-100]), "truncated"),
        (lambda b: (b / "weights.pt").write_bytes(b"\0" + (b / "weights.pt").read_bytes()[1:]), "SHA-256"),
        (lambda b: (b / "validation.npz").unlink(), "missing"),
        (lambda b: (b / "bundle.json").write_text("{not json"), "not valid JSON"),
        (lambda b: (b / "bundle.json").unlink(), "not a flowsort model bundle"),
    ],
)
def test_damaged_bundle_is_refused(bundle_copy: Path, damage, message: str) -> None:
    damage(bundle_copy)
    with pytest.raises(UserError, match=message):
        load_bundle(bundle_copy)


def edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "bundle.json").read_text())
    change(manifest)
    (bundle / "bundle.json").write_text(json.dumps(manifest))


def test_other_schema_version_and_mismatched_manifest_are_refused(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda m: m.update(schema_version=99))
    with pytest.raises(UserError, match="schema version 99"):
        load_bundle(bundle_copy)
    edit_manifest(bundle_copy, lambda m: m.update(schema_version=1, channels=m["channels"][:1]))
    with pytest.raises(UserError, match="1 channels but the model takes 2"):
        load_bundle(bundle_copy)

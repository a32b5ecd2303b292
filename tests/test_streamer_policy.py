"""Sort gates, lateness, and the configuration they come from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowsort.errors import UserError
from streamer.config import ConfigError, GateConfig, load_config, parse_config
from engines.bundle import Bundle
from streamer.policy import NO_GATE, Policy, policy_for, prior_weights

CLASSES = ("G1", "S_phase", "G2", "Prophase", "Metaphase")
REPO = Path(__file__).resolve().parents[1]


def policy(*gates: GateConfig, threshold: float = 5.0) -> Policy:
    return Policy(CLASSES, gates, threshold)


def probabilities(*rows: list[float]) -> np.ndarray:
    return np.array(rows, np.float32)


MITOTIC = GateConfig("mitotic", ("Prophase", "Metaphase"), min_probability=0.8, stream=1)
G2 = GateConfig("g2", ("G2",), min_probability=0.5, stream=2)


def test_label_probability_and_dead_flag() -> None:
    columns = policy().decide(probabilities([0.1, 0.7, 0.1, 0.05, 0.05], [0.6, 0.1, 0.1, 0.1, 0.1]),
                              np.array([1.0, 7.0], np.float32))
    assert columns.label.tolist() == [1, 0]
    assert columns.probability.tolist() == pytest.approx([0.7, 0.6])
    assert columns.dead.tolist() == [False, True]
    assert columns.gate.tolist() == [NO_GATE, NO_GATE]  # no gates: nothing sorted


def test_first_matching_gate_wins_and_sums_its_classes() -> None:
    p = policy(MITOTIC, G2, GateConfig("any_g2", ("G2",), min_probability=0.1, stream=3))
    columns = p.decide(
        probabilities(
            [0.0, 0.0, 0.1, 0.45, 0.45],  # mitotic by the sum of two classes (0.9)
            [0.0, 0.0, 0.6, 0.2, 0.2],  # mitotic 0.4 < 0.8; G2 0.6 >= 0.5
            [0.5, 0.2, 0.3, 0.0, 0.0],  # only the third gate
            [1.0, 0.0, 0.0, 0.0, 0.0],  # none
        ),
        np.zeros(4, np.float32),
    )
    assert columns.gate.tolist() == [0, 1, 2, NO_GATE]
    assert [p.gate_names[g] for g in columns.gate] == ["mitotic", "g2", "any_g2", ""]
    assert [p.gate_streams[g] for g in columns.gate] == [1, 2, 3, 0]


def test_dead_cells_are_excluded_unless_the_gate_says_otherwise() -> None:
    keep_dead = GateConfig("all_g1", ("G1",), min_probability=0.5, exclude_dead=False, stream=4)
    p = policy(GateConfig("g1", ("G1",), min_probability=0.5), keep_dead)
    columns = p.decide(probabilities([0.9, 0.1, 0, 0, 0], [0.9, 0.1, 0, 0, 0]), np.array([1.0, 9.0], np.float32))
    assert columns.gate.tolist() == [0, 1]


def test_min_probability_one_is_reachable() -> None:
    p = policy(GateConfig("all", CLASSES, min_probability=1.0))
    rng = np.random.default_rng(0)
    x = rng.random((50, len(CLASSES))).astype(np.float32)
    x /= x.sum(axis=1, keepdims=True)
    assert (p.decide(x, np.zeros(50, np.float32)).gate == 0).all()


def test_gate_with_unknown_class_is_refused() -> None:
    with pytest.raises(UserError, match="Prophasee"):
        policy(GateConfig("typo", ("Prophasee",)))


def bundle_trained_on(counts: dict[str, int] | None) -> Bundle:
    provenance = {} if counts is None else {"train_class_counts": counts}
    return Bundle(Path("/bundles/b"), {"class_names": list(CLASSES), "provenance": provenance,
                                       "dead_cell_detector": {"threshold": 5.0}})


def test_sample_prior_reweights_probabilities_by_bayes_rule() -> None:
    bundle = bundle_trained_on({"G1": 100, "S_phase": 100, "G2": 100, "Prophase": 100, "Metaphase": 100})
    sample = {"G1": 0.55, "S_phase": 0.27, "G2": 0.16, "Prophase": 0.015, "Metaphase": 0.005}
    config = parse_config({"policy": {"sample_prior": sample}, "gates": [
        {"name": "mitotic", "classes": ["Prophase", "Metaphase"], "min_probability": 0.8}]})
    adjusted_policy = policy_for(bundle, config)
    row = probabilities([0.0, 0.0, 0.1, 0.85, 0.05])
    # Trained on an even mix, this cell passes the mitotic gate; in a sample where G2 is ten times as common
    # as prophase, Bayes' rule says it is most likely G2.
    assert policy(MITOTIC).decide(row, np.zeros(1, np.float32)).gate[0] == 0
    adjusted = adjusted_policy.adjust(row)
    expected = row[0] * np.array(list(sample.values())) / 0.2
    np.testing.assert_allclose(adjusted[0], expected / expected.sum(), rtol=1e-5)
    columns = adjusted_policy.decide(adjusted, np.zeros(1, np.float32))
    assert columns.gate[0] == NO_GATE and CLASSES[columns.label[0]] == "G2"
    # the training mix itself changes nothing
    same = parse_config({"policy": {"sample_prior": dict.fromkeys(CLASSES, 1)}})
    np.testing.assert_allclose(policy_for(bundle, same).adjust(row), row, rtol=1e-6)
    assert policy_for(bundle, parse_config({})).adjust(row) is row


@pytest.mark.parametrize(
    ("counts", "sample", "message"),
    [
        ({c: 10 for c in CLASSES}, {"G1": 1}, "missing: S_phase, G2, Prophase, Metaphase"),
        ({c: 10 for c in CLASSES}, {**dict.fromkeys(CLASSES, 1), "Anaphase": 1}, "unknown: Anaphase"),
        ({c: 10 for c in CLASSES}, {**dict.fromkeys(CLASSES, 1), "G1": 0}, "positive"),
        ({**{c: 10 for c in CLASSES}, "Metaphase": 0}, dict.fromkeys(CLASSES, 1), "no training cells of Metaphase"),
        (None, dict.fromkeys(CLASSES, 1), "does not record its training class frequencies"),
    ],
)
def test_sample_prior_errors_say_what_to_fix(counts, sample, message) -> None:
    with pytest.raises(UserError, match=message):
        prior_weights(bundle_trained_on(counts), sample)


def test_example_config_parses_and_documents_every_key() -> None:
    path = REPO / "deploy" / "streamer.toml"
    config = load_config(path)
    assert [g.name for g in config.gates] == ["mitotic", "g2"]
    assert config.batching.max_batch == 64 and config.ingest.mode == "bind"
    text = path.read_text()
    from dataclasses import fields

    from streamer.config import SECTIONS, GateConfig as Gate
    for section, cls in SECTIONS.items():
        assert f"[{section}]" in text
        for field in fields(cls):
            assert f"{field.name} =" in text, f"deploy/streamer.toml does not document [{section}] {field.name}"
    for field in fields(Gate):
        assert f"{field.name} =" in text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"batching": {"max_delay": 1}}, r"\[batching\] has unknown key\(s\) max_delay"),
        ({"batching": {"max_delay_us": -1}}, r"\[batching\] max_delay_us"),
        ({"batching": {"batch_sizes": [2, 4]}}, r"must include 1"),
        ({"batching": {"overload": "panic"}}, r"\[batching\] overload"),
        ({"batching": {"queue_cells": 10}}, r"queue_cells"),
        ({"ingest": {"mode": "listen"}}, r"\[ingest\] mode"),
        ({"ingest": {"hwm": "many"}}, r"\[ingest\] hwm must be an integer"),
        ({"gates": [{"name": "x"}]}, r"\[\[gates\]\] #1 needs classes"),
        ({"gates": [{"name": "x", "classes": ["G1"], "min_probability": 2}]}, r"'x' min_probability"),
        ({"gates": [{"name": "x", "classes": ["G1"], "stream": 0}]}, r"'x' stream"),
        ({"gates": [{"name": "x", "classes": ["G1"]}, {"name": "x", "classes": ["G2"]}]}, r"unique"),
        ({"security": {"curve": True}}, r"secret_key_file"),
        ({"sorter": {}}, r"unknown section"),
        ({"policy": {"sample_prior": [0.9, 0.1]}}, r"sample_prior must be a table of class = frequency"),
        ({"policy": {"sample_prior": {"G1": "most"}}}, r"sample_prior must be a table"),
    ],
)
def test_config_errors_name_the_key(data, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "s.toml")


def test_a_retired_key_is_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A key an earlier version read (the emitter thread's queue) must not stop an upgraded service."""
    with caplog.at_level("WARNING"):
        config = parse_config({"batching": {"emit_queue_messages": 4096, "max_delay_us": 300.0}}, "s.toml")
    assert config.batching.max_delay_us == 300.0
    assert "[batching] emit_queue_messages is no longer used" in caplog.text and "s.toml" in caplog.text


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[ingest\nendpoint = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_defaults_without_a_file() -> None:
    config = load_config(None)
    assert config.ingest.endpoint == "tcp://127.0.0.1:5555" and config.push.endpoint.endswith(":5556")
    assert config.gates == () and config.deadline.budget_us == 10000.0

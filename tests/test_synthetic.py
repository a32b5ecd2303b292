"""The synthetic cytometer: IFC-like optics, stage sizes, priors, truth, determinism."""

from pathlib import Path

import numpy as np
import pytest

from engines.preprocessing import border_median
from trainer.dataset import UNLABELED, read_dataset, write_dataset
from trainer.synthetic import (
    JURKAT_PRIOR,
    MAX_VALUE,
    STAGES,
    CellPool,
    SyntheticCells,
    generate,
    resolve_prior,
    to_dataset,
)

G1, S_PHASE, G2 = (STAGES.index(name) for name in ("G1", "S_phase", "G2"))


@pytest.fixture(scope="module")
def uniform_cells() -> SyntheticCells:
    """Every stage well represented, plus dead cells and debris."""
    return generate(3000, seed=11, prior="uniform", dead_fraction=0.08, debris_fraction=0.08)


@pytest.fixture(scope="module")
def jurkat_cells() -> SyntheticCells:
    return generate(4000, seed=5)


def cell_area(images: np.ndarray) -> np.ndarray:
    """Pixels whose brightfield (3x3 mean) departs from the background by > 30 ADU:
    the bright cell, its dark membrane ring and halo. A crude size feature on purpose."""
    brightfield = images[:, 0].astype(np.float32)
    size = brightfield.shape[-1]
    padded = np.pad(brightfield, ((0, 0), (1, 1), (1, 1)), mode="edge")
    smooth = sum(padded[:, dy : dy + size, dx : dx + size] for dy in range(3) for dx in range(3)) / 9
    background = border_median(brightfield)[:, None, None]
    return (np.abs(smooth - background) > 30).sum(axis=(1, 2))


def test_shapes_types_and_12_bit_range(uniform_cells: SyntheticCells) -> None:
    cells = uniform_cells
    assert cells.images.shape == (3000, 2, 40, 40) and cells.images.dtype == np.uint16
    assert cells.images.max() <= MAX_VALUE
    assert cells.stage.dtype == np.int16 and cells.dead.dtype == bool and cells.debris.dtype == bool
    assert not (cells.dead & cells.debris).any()
    np.testing.assert_array_equal(cells.stage == UNLABELED, cells.dead | cells.debris)
    assert set(np.unique(cells.stage[cells.stage >= 0])) == set(range(len(STAGES)))


def test_brightfield_is_bright_with_a_dark_border_and_darkfield_is_dark(uniform_cells: SyntheticCells) -> None:
    viable = uniform_cells.images[uniform_cells.stage >= 0].astype(np.float32)
    brightfield, darkfield = viable[:, 0], viable[:, 1]
    bf_background = border_median(brightfield)
    assert np.all(np.abs(bf_background - 677) < 15)
    # The membrane ring is the darkest part of a brightfield cell, well below the background.
    assert np.mean(brightfield.min(axis=(1, 2)) < bf_background - 80) > 0.95
    # Camera noise on the flat background: a few ADU, as on the instrument.
    assert 3 < np.median(brightfield[:, :2, :].std(axis=(1, 2))) < 9
    df_background = border_median(darkfield)
    assert np.all(df_background < 40) and np.all(df_background > 15)
    center = darkfield[:, 16:24, 16:24]
    assert np.median(np.median(center, axis=(1, 2))) < 0.5 * np.median(df_background)
    # Granular side scatter: bright spots far above the dim background in most cells.
    assert np.mean(darkfield.max(axis=(1, 2)) > 100) > 0.8


def test_interphase_cells_grow_but_sizes_overlap(uniform_cells: SyntheticCells) -> None:
    area = cell_area(uniform_cells.images)
    stage = uniform_cells.stage
    mean = {s: area[stage == s].mean() for s in (G1, S_PHASE, G2)}
    assert mean[G1] < mean[S_PHASE] < mean[G2]
    # No threshold on size separates G1 from S: a model cannot reach 100% on size alone.
    g1, s_phase = area[stage == G1], area[stage == S_PHASE]
    thresholds = np.unique(np.concatenate([g1, s_phase]))
    best = max(((g1 <= t).sum() + (s_phase > t).sum()) / (g1.size + s_phase.size) for t in thresholds)
    assert 0.6 < best < 0.9


def test_dead_cells_and_debris_look_different(uniform_cells: SyntheticCells) -> None:
    area = cell_area(uniform_cells.images)
    g1 = np.median(area[uniform_cells.stage == G1])
    assert np.median(area[uniform_cells.dead]) < g1
    assert np.median(area[uniform_cells.debris]) < 0.4 * g1


def test_jurkat_prior_and_fractions_are_respected(jurkat_cells: SyntheticCells) -> None:
    assert abs(jurkat_cells.dead.mean() - 0.05) < 0.015
    assert abs(jurkat_cells.debris.mean() - 0.03) < 0.012
    stages = jurkat_cells.stage[jurkat_cells.stage >= 0]
    shares = np.bincount(stages, minlength=len(STAGES)) / stages.size
    for index, name in enumerate(STAGES):
        assert abs(shares[index] - JURKAT_PRIOR[name]) < 0.03, name
    assert shares[:3].sum() > 0.95  # interphase dominates


def test_uniform_and_custom_priors() -> None:
    uniform = generate(2100, seed=3, prior="uniform", dead_fraction=0, debris_fraction=0)
    shares = np.bincount(uniform.stage, minlength=len(STAGES)) / len(uniform)
    assert np.all(np.abs(shares - 1 / len(STAGES)) < 0.035)
    custom = generate(400, seed=3, prior={"G1": 1, "Metaphase": 3}, dead_fraction=0, debris_fraction=0)
    assert set(np.unique(custom.stage)) == {G1, STAGES.index("Metaphase")}
    assert 0.65 < np.mean(custom.stage == STAGES.index("Metaphase")) < 0.85
    assert resolve_prior({"G1": 2, "G2": 2}) == {**dict.fromkeys(STAGES, 0.0), "G1": 0.5, "G2": 0.5}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prior": "hela"},
        {"prior": {"G3": 1.0}},
        {"prior": {"G1": -1.0}},
        {"dead_fraction": 0.7, "debris_fraction": 0.4},
        {"size": 31},
    ],
)
def test_bad_arguments_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate(10, seed=0, **kwargs)


def test_same_seed_same_bytes_other_seed_other_cells() -> None:
    first = generate(600, seed=7, prior="uniform")
    again = generate(600, seed=7, prior="uniform")
    other = generate(600, seed=8, prior="uniform")
    assert first.images.tobytes() == again.images.tobytes()
    np.testing.assert_array_equal(first.stage, again.stage)
    assert first.images.tobytes() != other.images.tobytes()
    assert (first.stage != other.stage).any()
    assert first.source["seed"] == 7 and first.source["prior_name"] == "uniform"


@pytest.mark.parametrize("size", [32, 64])
def test_other_image_sizes_keep_the_pixel_scale(size: int, uniform_cells: SyntheticCells) -> None:
    cells = generate(400, seed=2, size=size, prior="uniform", dead_fraction=0, debris_fraction=0)
    assert cells.images.shape == (400, 2, size, size)
    g1_area = np.median(cell_area(cells.images[cells.stage == G1]))
    reference = np.median(cell_area(uniform_cells.images[uniform_cells.stage == G1]))
    assert abs(g1_area / reference - 1) < 0.2
    # Small frames cut into Telophase doublets, so only most borders are pure background.
    assert np.mean(np.abs(border_median(cells.images[:, 0].astype(np.float32)) - 677) < 15) > 0.9


def test_dataset_round_trip(tmp_path: Path) -> None:
    cells = generate(300, seed=4, dead_fraction=0.1, debris_fraction=0.1)
    dataset = to_dataset(cells)
    loaded = read_dataset(write_dataset(tmp_path / "synthetic", dataset))
    np.testing.assert_array_equal(loaded.images, cells.images)
    np.testing.assert_array_equal(loaded.labels, cells.stage)
    for name in ("stage", "dead", "debris"):
        np.testing.assert_array_equal(loaded.truth[name], getattr(cells, name))
    assert loaded.class_names == STAGES
    assert loaded.channels == (3, 6) and loaded.channel_names == ("brightfield", "darkfield")
    assert loaded.source["kind"] == "synthetic" and loaded.source["seed"] == 4
    assert loaded.summary["dead"] == int(cells.dead.sum())
    assert sum(loaded.class_counts().values()) == int((cells.stage >= 0).sum())


def test_pool_draws_known_cells_with_fresh_noise() -> None:
    pool = CellPool(1, seed=3, dead_fraction=0, debris_fraction=0)
    drawn = pool.sample(4, np.random.default_rng(0))
    assert drawn.images.shape == (4, 2, 40, 40) and drawn.images.dtype == np.uint16
    assert len(set(drawn.stage.tolist())) == 1  # one pooled cell, one truth
    first, second = drawn.images[:2].astype(np.int32)
    assert (first != second).any()
    # Same cell under flips and new noise: its sorted pixel values agree to within the noise.
    assert np.abs(np.sort(first, axis=None) - np.sort(second, axis=None)).mean() < 6

    pool = CellPool(300, seed=3, prior="uniform", rotate90=True)
    a, b = (pool.sample(200, np.random.default_rng(9)) for _ in range(2))
    assert a.images.tobytes() == b.images.tobytes()
    assert set(np.unique(a.stage)) <= set(range(-1, len(STAGES)))

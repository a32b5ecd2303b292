"""Fixtures shared across the test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

JURKAT_ENV = "FLOWSORT_JURKAT_DIR"


@pytest.fixture(scope="session", autouse=True)
def engine_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Engines compile into the test session's own cache (engines.cache), never the user's; subprocesses inherit it."""
    from engines.cache import ENV_VAR

    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = str(tmp_path_factory.mktemp("engine-cache"))
    yield Path(os.environ[ENV_VAR])
    if previous is None:
        del os.environ[ENV_VAR]
    else:
        os.environ[ENV_VAR] = previous


@pytest.fixture(scope="session")
def jurkat_dir() -> Path:
    """The real Jurkat IFC sample: ``shared/data/jurkat-ifc`` next to the repo, or $FLOWSORT_JURKAT_DIR."""
    path = Path(os.environ.get(JURKAT_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data" / "jurkat-ifc")
    if not path.is_dir():
        pytest.skip(f"Jurkat IFC sample not found at {path} (set {JURKAT_ENV} to its folder)")
    return path


@pytest.fixture(scope="session")
def jurkat_dataset(jurkat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Jurkat sample imported once (Ch3 brightfield, Ch6 darkfield, 40x40): a dataset folder."""
    from trainer.dataset import write_dataset
    from trainer.tiff_tree import import_ideas

    dataset = import_ideas(jurkat_dir, (3, 6), 40, ("brightfield", "darkfield"), strict=True)
    return write_dataset(tmp_path_factory.mktemp("jurkat") / "dataset", dataset)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,600 synthetic cells, every stage well represented, with dead cells and debris."""
    from trainer.dataset import write_dataset
    from trainer.synthetic import generate, to_dataset

    cells = generate(1600, seed=11, size=40, prior="uniform", dead_fraction=0.08, debris_fraction=0.04)
    return write_dataset(tmp_path_factory.mktemp("synthetic") / "dataset", to_dataset(cells))


@pytest.fixture(scope="session")
def tiny_bundle(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small DeepFlow (width 0.25) trained briefly on ``synthetic_dataset``: a real bundle for tests."""
    from flowsort.cli import main

    bundle = tmp_path_factory.mktemp("bundle") / "tiny"
    assert main(["train", str(synthetic_dataset), "-o", str(bundle), "--width", "0.25", "--epochs", "6",
                 "--seed", "3"]) == 0
    return bundle


@pytest.fixture(scope="session")
def quick_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle trained for seconds (300 cells of 32x32, 3 epochs): for tests of what consumes bundles, not of accuracy."""
    from flowsort.cli import main
    from trainer.dataset import write_dataset
    from trainer.synthetic import generate, to_dataset

    folder = tmp_path_factory.mktemp("quick")
    cells = generate(300, seed=5, size=32, prior="uniform", dead_fraction=0.08, debris_fraction=0.04)
    dataset = write_dataset(folder / "dataset", to_dataset(cells))
    bundle = folder / "bundle"
    assert main(["train", str(dataset), "-o", str(bundle), "--width", "0.25", "--epochs", "3", "--batch-size", "32",
                 "--lr", "0.1", "--seed", "0"]) == 0
    return bundle

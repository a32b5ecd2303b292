"""IDEAS per-object TIFF trees, and the TIFF handling both importers share.

An IDEAS export is one TIFF per object and channel, ``<label>/<object_id>_Ch<k>.tif``
with one folder per class, or the TIFFs directly in the export folder when the
cells are unlabeled. CellProfiler montages (:mod:`trainer.montage`) follow the
same ``<name>_Ch<k>.tif`` layout with a montage name instead of an object id, so
discovering the tree and reading one group of channel files live here.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from flowsort.errors import UserError
from trainer.dataset import CellDataset
from trainer.import_report import CellCollector, ImportReport

FILE_PATTERN = re.compile(r"^(?P<name>.+)_Ch(?P<channel>\d+)(?:\.ome)?\.tiff?$", re.IGNORECASE)
TIFF_SUFFIXES = (".tif", ".tiff")
OBJECT_ID = re.compile(r"\d+", re.ASCII)


class TiffProblem(Exception):
    """A TIFF that cannot be a cell image; the message is the reason shown to the user."""


@dataclass
class Group:
    """The channel files of one object (IDEAS) or one montage: ``<folder>/<name>_Ch<k>.tif``."""

    label: str | None
    name: str
    folder: Path
    files: dict[int, Path]
    ambiguous: bool = False  # two files claim the same channel; already reported

    @property
    def path(self) -> Path:
        """How problems with the group as a whole name it: ``<folder>/<name>_Ch*.tif``."""
        return self.folder / f"{self.name}_Ch*.tif"


@dataclass
class Tree:
    """The groups that have every requested channel, and how many groups were found."""

    groups: list[Group]
    n_found: int


def default_channel_names(channels: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(f"Ch{channel}" for channel in channels)


def read_tiff(path: Path) -> tuple[np.ndarray, int]:
    """One single-page, 2-D, 8- or 16-bit TIFF and its bit depth, or :class:`TiffProblem`."""
    try:
        with tifffile.TiffFile(path) as tif:
            n_pages = len(tif.pages)
            if n_pages == 1:
                page = tif.pages[0]
                image, bits = page.asarray(), int(page.bitspersample)
    except PermissionError as exc:
        raise TiffProblem("unreadable: permission denied (check the file's permissions)") from exc
    except IsADirectoryError as exc:
        raise TiffProblem("unreadable: a folder, not a file") from exc
    except FileNotFoundError as exc:
        raise TiffProblem("unreadable: the file vanished or is a broken symbolic link") from exc
    except OSError as exc:
        raise TiffProblem(f"unreadable: {exc.strerror or exc}") from exc
    except Exception as exc:  # tifffile raises many exception types on damaged bytes
        raise TiffProblem(f"corrupt or truncated TIFF ({type(exc).__name__}: {exc})") from exc
    if n_pages != 1:
        raise TiffProblem(f"{n_pages}-page TIFF: expected exactly one image per file")
    if image.ndim != 2 or image.size == 0:
        raise TiffProblem(f"image of shape {image.shape}: expected one 2-D grayscale image per file")
    if image.dtype.kind != "u" or image.dtype.itemsize > 2:
        raise TiffProblem(f"{image.dtype} pixels: expected 8- or 16-bit unsigned integers")
    return image, bits


def read_group(group: Group, channels: tuple[int, ...], report: ImportReport) -> np.ndarray | None:
    """The group's channels stacked ``[C, H, W]`` in ``channels`` order, or None after reporting."""
    images = []
    for channel in channels:
        path = group.files[channel]
        try:
            image, bits = read_tiff(path)
        except TiffProblem as problem:
            report.problem(path, str(problem))
            continue
        report.bit_depths.add(bits)
        images.append(image)
    if len(images) != len(channels):
        return None
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        sizes = ", ".join(f"Ch{c} {h}x{w}" for c, (h, w) in zip(channels, (i.shape for i in images)))
        report.problem(group.path, f"channels differ in size ({sizes}): they cannot be one cell")
        return None
    return np.stack(images)


def scan_tree(root: str | Path, channels: tuple[int, ...], report: ImportReport, unit: str) -> Tree:
    """Find ``<label>/<name>_Ch<k>.tif`` groups (or ``<name>_Ch<k>.tif`` when unlabeled).

    Non-TIFF files next to the class folders (a manifest, notes) are ignored.
    Anything else that does not fit the layout is reported, and so is a group
    missing one of ``channels``; ``unit`` ("object", "montage") names a group
    in those messages.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: pass the export folder holding the class folders or the TIFFs")
    entries = _visible_entries(root)
    folders = [e for e in entries if e.is_dir() and not FILE_PATTERN.match(e.name)]
    folder_names = {e.name for e in folders}
    tiffs = [e for e in entries if e.name not in folder_names and e.name.lower().endswith(TIFF_SUFFIXES)]
    found: dict[tuple[str | None, str], Group] = {}
    if folders:
        for entry in tiffs:
            report.problem(entry.path, "TIFF outside the class folders: move it into the folder of its class")
        for folder in folders:
            before = len(found)
            _collect(Path(folder.path), folder.name, _visible_entries(Path(folder.path)), found, report)
            if len(found) == before:
                reason = f"empty class folder: no <{unit}>_Ch<k>.tif files, so the class is left out"
                report.problem(folder.path, reason)
    else:
        _collect(root, None, tiffs, found, report)
    seen = sorted({channel for group in found.values() for channel in group.files})
    complete = []
    for group in found.values():
        if group.ambiguous:
            continue
        missing = [channel for channel in channels if channel not in group.files]
        if missing:
            report.problem(
                group.folder / f"{group.name}_Ch{missing[0]}.tif",
                f"{unit} {group.name} has no Ch{missing[0]} file (its channels: "
                f"{', '.join(f'Ch{c}' for c in sorted(group.files))}; the tree has "
                f"{', '.join(f'Ch{c}' for c in seen)}; check --channels)",
            )
        else:
            complete.append(group)
    return Tree(groups=complete, n_found=len(found))


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    """Sorted entries without hidden files (``.DS_Store``, ``._*`` resource forks)."""
    with os.scandir(folder) as entries:
        return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _collect(
    folder: Path,
    label: str | None,
    entries: list[os.DirEntry],
    found: dict[tuple[str | None, str], Group],
    report: ImportReport,
) -> None:
    """Add the ``<name>_Ch<k>.tif`` files of one folder to ``found``; report the rest."""
    for entry in entries:
        match = FILE_PATTERN.match(entry.name)
        if match is None:
            what = "folder (class folders cannot be nested)" if entry.is_dir() else "file"
            report.problem(entry.path, f"unexpected {what}: names must look like <id>_Ch<k>.tif")
            continue
        key = (label, match["name"])
        group = found.setdefault(key, Group(label, match["name"], folder, {}))
        channel = int(match["channel"])
        if channel in group.files:
            # Which of the two files is the cell would be a guess: import neither.
            report.problem(entry.path, f"second Ch{channel} file for {match['name']} (also {group.files[channel]})")
            group.ambiguous = True
        group.files.setdefault(channel, Path(entry.path))


def import_ideas(
    root: str | Path,
    channels: tuple[int, ...],
    size: int,
    channel_names: tuple[str, ...] | None = None,
    strict: bool = False,
) -> CellDataset:
    """Read an IDEAS per-object TIFF tree into a dataset of ``size`` x ``size`` cells."""
    from tqdm import tqdm

    report = ImportReport(strict)
    tree = scan_tree(root, channels, report, unit="object")
    collector = CellCollector(size, report)
    for group, object_id in tqdm(_numbered(tree.groups, report), desc="reading TIFFs", unit="cell", disable=None):
        cell = read_group(group, channels, report)
        if cell is not None:
            collector.add(cell[None], group.label, np.array([object_id]))
    source = {"kind": "ideas", "path": str(Path(root).resolve()), "channels": list(channels)}
    return collector.build(
        channels, channel_names or default_channel_names(channels), source, n_skipped=tree.n_found - len(collector)
    )


def _numbered(groups: list[Group], report: ImportReport) -> list[tuple[Group, int]]:
    """Groups with their numeric object id; non-numeric and repeated ids are reported and left out."""
    numbered = []
    for group in groups:
        if OBJECT_ID.fullmatch(group.name):
            numbered.append((group, int(group.name)))
        else:
            report.problem(
                group.files[min(group.files)],
                f"object id {group.name!r} is not a number: IDEAS files are named <object_id>_Ch<k>.tif",
            )
    counts = Counter(object_id for _, object_id in numbered)
    for group, object_id in numbered:
        if counts[object_id] > 1:
            report.problem(
                group.path, f"object id {object_id} occurs {counts[object_id]} times: which is the cell is unknown"
            )
    return [(group, object_id) for group, object_id in numbered if counts[object_id] == 1]

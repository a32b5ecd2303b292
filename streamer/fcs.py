"""FCS 3.1 list-mode files, written incrementally: what FlowJo, FlowKit and FCS Express open.

Layout of a file (offsets from the file's first byte, end offsets inclusive)::

    HEADER  "FCS3.1" + 4 spaces + six 8-digit right-justified offsets (58 bytes)
    TEXT    |$KEY|value|...| at byte 58
    spaces  up to the reserved DATA start
    DATA    events x parameters, little-endian float32 ($DATATYPE F) or float64 (D)

The DATA segment starts at a fixed offset chosen when the file is opened:
TEXT gets room for its widest possible values ($TOT, $ENDDATA, $PnR) plus
slack, so rows can be appended from the start and the TEXT rewritten in place
on :meth:`FcsWriter.close` without copying the data. Until then the file is
``NAME.partial``; only a finished file is renamed to ``NAME``, so a crash
leaves a ``.partial`` and never a ``.fcs`` with a wrong event count.

The HEADER holds offsets only up to 99,999,999: past that, as FCS 3.1 says,
it holds 0 for the DATA segment and readers take $BEGINDATA/$ENDDATA.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from flowsort.errors import UserError

VERSION = b"FCS3.1"
HEADER_SIZE = 58
HEADER_LIMIT = 99_999_999  # largest offset the HEADER's 8-character fields hold
DATATYPES = {"F": np.dtype("<f4"), "D": np.dtype("<f8")}
DELIMITERS = "|/\\*!^~"  # the first one absent from every keyword and value is used
TEXT_SLACK = 2048  # room for keywords given at close (counts, end time)
RANGE_CAP = 10**15  # $PnR written for columns with huge or non-finite values
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class Parameter:
    """One FCS parameter (a column): ``name`` is $PnN (what gates refer to), ``label`` $PnS (for people)."""

    name: str
    label: str = ""


def header(text_start: int, text_end: int, data_start: int, data_end: int) -> bytes:
    """The 58-byte HEADER; a segment reaching past 99,999,999 gets 0, 0 (its TEXT keywords hold the offsets)."""
    def pair(start: int, end: int) -> tuple[int, int]:
        return (start, end) if end <= HEADER_LIMIT else (0, 0)

    offsets = (*pair(text_start, text_end), *pair(data_start, data_end), 0, 0)  # no ANALYSIS segment
    return VERSION + b"    " + b"".join(b"%8d" % value for value in offsets)


def encode_text(keywords: Mapping[str, str]) -> bytes:
    """A TEXT segment: delimiter, then key, delimiter, value, delimiter for each keyword.

    The delimiter is the first of ``DELIMITERS`` that no key or value contains; where
    every one occurs, ``|`` is used and escaped by doubling, as FCS 3.1 specifies.
    """
    for key, value in keywords.items():
        if not key or not value:
            raise ValueError(f"FCS keywords and values must not be empty: {key!r} = {value!r}")
    everything = "".join(f"{key}{value}" for key, value in keywords.items())
    delimiter = next((d for d in DELIMITERS if d not in everything), "|")
    escape = delimiter * 2
    parts = [f"{key.replace(delimiter, escape)}{delimiter}{value.replace(delimiter, escape)}"
             for key, value in keywords.items()]
    return (delimiter + delimiter.join(parts) + delimiter).encode("utf-8")


def parameter_range(maximum: float) -> str:
    """$PnR for a float column: its largest value rounded up, at least 1."""
    if math.isnan(maximum) or maximum >= RANGE_CAP:
        return str(RANGE_CAP)
    return str(max(1, math.ceil(maximum)))


class FcsWriter:
    """Appends events to ``path + '.partial'``; :meth:`close` writes the final TEXT and renames it to ``path``.

    ``keywords`` are extra TEXT keywords ($DATE, $BTIM, $TIMESTEP, FLOWSORT_...); the
    writer owns the structural ones ($PAR, $TOT, offsets, $PnN/$PnS/$PnB/$PnE/$PnR).
    """

    def __init__(self, path: str | Path, parameters: Sequence[Parameter], keywords: Mapping[str, str] | None = None,
                 datatype: str = "F") -> None:
        if datatype not in DATATYPES:
            raise ValueError(f"datatype must be one of {', '.join(DATATYPES)}, got {datatype!r}")
        names = [p.name for p in parameters]
        if not names or len(set(names)) != len(names) or any("," in n or not n for n in names):
            raise ValueError(f"parameter names must be unique, non-empty and free of commas: {names}")
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.parameters = tuple(parameters)
        self.keywords = dict(keywords or {})
        self.datatype = datatype
        self.dtype = DATATYPES[datatype]
        self.events = 0
        self.maxima = np.zeros(len(self.parameters))  # $PnR is at least 1 anyway
        widest = "9" * 20
        reserved = len(self._text(widest, widest, widest, [str(RANGE_CAP)] * len(names), {})) + TEXT_SLACK
        self.data_start = HEADER_SIZE + reserved
        try:
            self._file: BinaryIO | None = self.partial.open("wb")
        except OSError as exc:
            raise UserError(f"cannot write FCS file {self.partial}: {exc}") from None
        self._write_head({})  # a readable TEXT ($TOT 0) from the start
        self._file.seek(self.data_start)

    def _text(self, tot: str, begin: str, end: str, ranges: Sequence[str], extra: Mapping[str, str]) -> bytes:
        bits = 8 * self.dtype.itemsize
        keywords = {
            "$BEGINANALYSIS": "0", "$ENDANALYSIS": "0", "$BEGINSTEXT": "0", "$ENDSTEXT": "0",
            "$BEGINDATA": begin, "$ENDDATA": end,
            "$BYTEORD": "1,2,3,4", "$DATATYPE": self.datatype, "$MODE": "L", "$NEXTDATA": "0",
            "$PAR": str(len(self.parameters)), "$TOT": tot,
        }
        for n, (parameter, value_range) in enumerate(zip(self.parameters, ranges), start=1):
            keywords[f"$P{n}N"] = parameter.name
            if parameter.label:
                keywords[f"$P{n}S"] = parameter.label
            keywords.update({f"$P{n}B": str(bits), f"$P{n}E": "0,0", f"$P{n}R": value_range})
        keywords.update(self.keywords)
        keywords.update(extra)
        return encode_text(keywords)

    def _write_head(self, extra: Mapping[str, str]) -> None:
        data_bytes = self.events * len(self.parameters) * self.dtype.itemsize
        # An empty DATA segment has offsets 0, 0.
        data_start, data_end = (self.data_start, self.data_start + data_bytes - 1) if data_bytes else (0, 0)
        text = self._text(str(self.events), str(data_start), str(data_end),
                          [parameter_range(m) for m in self.maxima], extra)
        text_end = HEADER_SIZE + len(text) - 1
        if text_end >= self.data_start:
            raise ValueError(f"{len(text)} bytes of TEXT exceed the {self.data_start - HEADER_SIZE} reserved for it: "
                             "pass fewer or shorter keywords at close")
        self._file.seek(0)
        self._file.write(header(HEADER_SIZE, text_end, data_start, data_end))
        self._file.write(text)
        self._file.write(b" " * (self.data_start - text_end - 1))

    def append(self, rows: np.ndarray) -> None:
        """Append events: ``rows`` is [N, parameters] in parameter order."""
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != len(self.parameters):
            raise ValueError(f"rows must be shaped [N, {len(self.parameters)}], got {list(rows.shape)}")
        if not len(rows):
            return
        data = np.ascontiguousarray(rows, self.dtype)
        with np.errstate(invalid="ignore"):
            np.fmax(self.maxima, data.max(axis=0), out=self.maxima)
        self._file.write(data.tobytes())
        self.events += len(data)

    def close(self, keywords: Mapping[str, str] | None = None) -> Path:
        """Write the final HEADER and TEXT (plus ``keywords``), sync, and rename the file into place."""
        if self._file is None:
            return self.path
        self._write_head(keywords or {})
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.partial, self.path)
        return self.path

    def discard(self) -> None:
        """Give up on the file (a failed export): remove the ``.partial``."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> FcsWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

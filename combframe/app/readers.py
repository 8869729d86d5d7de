"""Molecular inputs of ``combframe train``: files or a built-in set to compounds of poses.

:func:`read_molecules` reads one of the formats of ``docs/data.md`` (a multi-record SDF,
SDF poses in a protein's pocket, a CSV manifest of pose files, SMILES with generated
conformers) or a built-in set by name (:data:`BUILT_IN`), and returns compounds whose
poses are PyTorch Geometric ``Data`` with ``pos`` (n, 3), ``z`` (n,) and ``lig`` (n,):

    files -> records (RDKit, :mod:`combframe.app.chem`) -> atoms per pose -> cache -> Data

The atoms are cached on disk, keyed by a hash of every input file's contents, the
options and the RDKit version, in a file that :func:`torch.load` reads with
``weights_only=True`` (no pickle); it is written to a temporary name and renamed, so an
error leaves no half-written entry. The entry holds its own key, checked on loading: an
entry that is not the one asked for (copied or renamed) is rebuilt. A record that cannot
be used stops the read with one line naming the file, the record and the compound, or
with ``skip_invalid`` is counted. So do conflicting entries: two values for one name,
two rows of one SMILES name, or different molecules under one SDF title.

SIGINT and SIGTERM during reading are recorded and raised as :class:`ReadInterruptedError`
after the RDKit call they arrived in (RDKit catches SIGINT while embedding and gives up
on the molecule; :mod:`combframe.app.chem` raises it again), so an interrupt is never
mistaken for a bad molecule and nothing is cached (a second signal stops at once, as
:func:`~combframe.app.checkpoint.stop_on_signals` does).

This module imports neither RDKit nor PyTorch Geometric: they are imported when a
molecular input is read, and their absence is a :class:`DataError` saying how to
install them.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
import math
import os
import signal
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from combframe.app.checkpoint import StopRequest, atomic_write, stop_on_signals
from combframe.app.data import MMFF_ENERGY, Compound, DataError
from combframe.errors import CombframeError

if TYPE_CHECKING:
    from combframe.app.chem import Atoms, SdfRecord
    from combframe.app.config import ReaderConfig

__all__ = [
    "BUILT_IN",
    "MoleculeSet",
    "ReadInterruptedError",
    "import_quietly",
    "is_molecular",
    "missing_note",
    "read_molecules",
    "require_chem",
    "skipped_note",
]

#: Bumped when the cached layout or the featurisation changes.
_CACHE_VERSION = 5

#: The built-in real data sets, by name: what they are (``--help`` and docs/data.md).
BUILT_IN = {
    "chembl": "RDKit's CHEMBL2321810 series: 1,017 SMILES with pIC50 values; "
    "conformers generated (reader.conformers)",
    "cmet": "RDKit's 24 c-Met ligands: 3D poses with experimental dG (r_exp_dg)",
    "posebusters": "posebusters' 4 PDB complexes: ligand poses in their protein pocket; "
    "value: the ligand's Crippen logP (computed, no measurement ships)",
}

_MOLECULE_SUFFIXES = (".sdf", ".smi", ".csv")


@dataclass(frozen=True)
class MoleculeSet:
    """Compounds read from molecular input, and the problems skipped on the way.

    Attributes
    ----------
    compounds
        Poses as ``Data`` (``pos``, ``z``, ``lig``; ``props`` when the input had
        per-pose numbers), a 0-d target, the name, per-pose ``properties``.
    skipped
        One line per record or compound left out under ``skip_invalid``.
    source
        The path read, or ``built-in <name>``.
    """

    compounds: list[Compound]
    skipped: tuple[str, ...]
    source: str


def import_quietly(module: str) -> ModuleType:
    """Import ``module`` without PyTorch Geometric's ``torch.jit.script`` deprecation warning.

    PyG 2.8 scripts a helper at import time, which recent torch reports on every import;
    the warning is about PyG's code, not the user's, so it is not passed on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.script` is", DeprecationWarning)
        return importlib.import_module(module)


def require_chem() -> None:
    """Raise a :class:`DataError` saying how to install RDKit and PyG if they are missing."""
    missing = []
    for module, what in (("rdkit", "RDKit"), ("torch_geometric", "PyTorch Geometric")):
        try:
            import_quietly(module)
        except ImportError:
            missing.append(what)
    if missing:
        raise DataError(
            f"molecular input needs {' and '.join(missing)}: pip install 'combframe[chem]'"
        )


def is_molecular(data: Path | None) -> bool:
    """Whether ``data`` names a built-in set or a molecular file (not the JSON of vectors)."""
    if data is None:
        return False
    return str(data) in BUILT_IN or data.suffix.lower() in _MOLECULE_SUFFIXES


# ---- records to raw compounds --------------------------------------------------------


#: A compound's value: one number, or one per target of a list ``reader.target`` (None
#: where the compound has none for that target).
Value = float | tuple[float | None, ...]


def _text(value: Value) -> str:
    """Write a value as messages show it: ``-6.1`` or ``(-6.1, none)``."""
    if isinstance(value, tuple):
        return "(" + ", ".join("none" if v is None else f"{v:g}" for v in value) + ")"
    return f"{value:g}"


def _present(cells: tuple[float | None, ...]) -> tuple[float | None, ...] | None:
    """Return the values of several targets, or None when the compound has none of them."""
    return cells if any(c is not None for c in cells) else None


def _row_value(row: dict[str, str], names: Sequence[str]) -> Value | None:
    """Return the value of a CSV row: its ``value`` column, or the columns of several targets."""
    if not names:
        return _number(row.get("value", ""))
    return _present(tuple(_number(row.get(n.lower(), "")) for n in names))


def _has_columns(path: Path, rows: list[dict[str, str]], names: Sequence[str]) -> None:
    """Refuse a target name that is no column of ``path``, naming the closest column."""
    from combframe.app.config import did_you_mean

    header = list(rows[0]) if rows else []
    for name in names:
        if name.lower() not in header:
            raise DataError(
                f"{str(path)!r}: reader.target {name!r} is not a column"
                f"{did_you_mean(name.lower(), header)}; its columns: {', '.join(header)}"
            )


@dataclass
class _Raw:
    """One compound before caching: its poses' atoms and per-pose numbers."""

    name: str
    value: Value | None
    where: str
    poses: list[Atoms] = field(default_factory=list)
    props: list[dict[str, float]] = field(default_factory=list)
    hint: str = ""  # why it has no value, when a close name suggests one
    missing: dict[str, str] = field(default_factory=dict)  # pose field -> why it has none


#: The value of a compound whose entries conflict: reported already, left out.
_CONFLICT = math.nan


def _conflicting(value: Value | None) -> bool:
    return isinstance(value, float) and math.isnan(value)


def skipped_note(skipped: Sequence[str]) -> str | None:
    """Return the note that ``skip_invalid`` left entries out (None if none was)."""
    if not skipped:
        return None
    return (
        f"reader.skip_invalid left out {len(skipped)} record(s) or compound(s); the "
        f"first: {skipped[0]}"
    )


def missing_note(compounds: Sequence[Compound]) -> str | None:
    """Return the note that some compounds lack a pose field, and why (None if none do).

    Conformers that ``reader.minimize`` could not minimise (MMFF94 has no parameters for
    the molecule) are used as embedded; this says how many and which first.
    """
    lacking = [c for c in compounds if c.missing]
    if not lacking:
        return None
    first = lacking[0]
    field, why = next(iter(dict(first.missing or {}).items()))
    return f"{len(lacking)} compound(s) have no {field}; the first, {first.name!r}: {why}"


class ReadInterruptedError(CombframeError, KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while molecules were read; nothing was cached.

    A :class:`KeyboardInterrupt` (what Ctrl-C raises) that says which signal came.

    Attributes
    ----------
    signum
        The signal's number (the command exits with ``128 + signum``).
    """

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} while reading the data; nothing was cached")
        self.signum = signum


class _Problems:
    """Raise each problem, or count it when ``skip`` (``skip_invalid``).

    ``stop`` holds the signal received while reading; :meth:`check` (called by
    :meth:`report` first, so an interrupted RDKit call is not blamed on the data, and
    after every compound) raises :class:`ReadInterruptedError` for it. ``values``: the
    compounds need values (training), so a target name that a file lacks altogether is
    an error; compounds to predict need none.
    """

    def __init__(self, skip: bool, stop: StopRequest | None = None, values: bool = True) -> None:
        self.skip = skip
        self.lines: list[str] = []
        self.stop = stop if stop is not None else StopRequest()
        self.values = values

    def check(self) -> None:
        if self.stop.signum:
            raise ReadInterruptedError(self.stop.signum)

    def report(self, where: str, problem: str) -> None:
        self.check()
        line = f"{where}: {problem}"
        if not self.skip:
            raise DataError(f"{line} (reader.skip_invalid=true leaves such entries out)")
        self.lines.append(line)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{str(path)!r} is not a readable CSV file: {exc}") from None
    return [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in rows]


@dataclass(frozen=True)
class _Values:
    """The ``reader.values`` CSV: its path and each name's value (:data:`_CONFLICT`)."""

    path: Path
    by_name: dict[str, Value]

    def get(self, name: str) -> tuple[Value | None, str]:
        """Return the value of ``name`` (None if absent) and, if absent, a hint."""
        if name in self.by_name:
            return self.by_name[name], ""
        from combframe.app.config import did_you_mean

        close = did_you_mean(name, list(self.by_name))
        return None, f" in {str(self.path)!r}{close}"


def _read_values(path: Path, problems: _Problems, names: Sequence[str] = ()) -> _Values:
    """Read a CSV of ``name,value`` rows (a header first): the value of each compound.

    With several target ``names`` the value is those columns (an empty cell: no value
    for that target). A name on rows with different values is reported (and its
    compound left out); a repeated row with the same value is accepted.
    """
    rows = _read_csv(path)
    _has_columns(path, rows, names)
    values: dict[str, Value] = {}
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        cells = list(row.values())
        value = _row_value(row, names) if names else None
        if not names and len(cells) >= 2:
            value = _number(cells[1])
        if value is None:
            what = f"name,{','.join(names)} (one value at least)" if names else "name,value"
            raise DataError(f"{str(path)!r}: row {i + 2}: expected {what}; got {cells}")
        name = cells[0]
        old = values.get(name)
        if old is not None and old != value:
            if not _conflicting(old):
                problems.report(
                    f"{str(path)!r}: rows {first[name]} and {i + 2} (compound {name!r})",
                    f"two values, {_text(old)} and {_text(value)}; keep one",
                )
            values[name] = _CONFLICT
            continue
        first.setdefault(name, i + 2)
        values[name] = value
    return _Values(path, values)


def _spread(count: int, limit: int | None) -> list[int]:
    """Pick ``limit`` of ``count`` indices spread evenly over them (all if None)."""
    if limit is None or limit >= count:
        return list(range(count))
    return [i * count // limit for i in range(limit)]


def _check_file(path: Path, role: str) -> Path:
    if not path.is_file():
        raise DataError(f"{role} {str(path)!r} does not exist or is not a file")
    return path


def _no_name(key: str | None, record: SdfRecord) -> str:
    if key:
        return f"has no property {key} to group by"
    props = ", ".join(sorted(record.properties)) or "none"
    return (
        "has no name (title line) to group by; give the records titles or group them "
        f"by an SD property with reader.group_by=<property> (this record's: {props})"
    )


@dataclass
class _Titled:
    """What the first record of an SDF title was: its molecule, value and record."""

    formula: str
    value: Value | None
    index: int


def _same_title(first: _Titled, formula: str, value: Value | None) -> str | None:
    """Why records ``first.index`` and ``index`` cannot be poses of one compound, or None."""
    if formula != first.formula:
        return f"is {formula} but record {first.index} of the same name is {first.formula}"
    if value is not None and first.value is not None and value != first.value:
        return (
            f"has the value {_text(value)} but record {first.index} of the same name "
            f"{_text(first.value)}"
        )
    return None


def _sdf(
    path: Path,
    opts: ReaderConfig,
    problems: _Problems,
    values: _Values | None,
    protein: Atoms | None,
    group: str | None = None,
) -> list[_Raw]:
    """Group the records of ``path`` into compounds (``group`` names all of them).

    Records grouped by their title must be one molecule (heavy-atom formula) with one
    value; a conflict leaves the compound out (or stops the read).
    """
    import combframe.app.chem as chem

    compounds: dict[str, _Raw] = {}
    titled: dict[str, _Titled] = {}
    try:
        records = list(chem.sdf_records(_check_file(path, "SDF")))
    except chem.ChemError as exc:
        raise DataError(f"{str(path)!r}: {exc}") from None
    for record in records:
        problems.check()
        key = opts.group_by
        name = group or (record.properties.get(key, "") if key else record.title)
        where = f"{str(path)!r}: record {record.index} (compound {name!r})"
        if record.mol is None:
            problems.report(where, "RDKit cannot read or sanitize this record")
            continue
        if not name:
            problems.report(where, _no_name(key, record))
            continue
        try:
            atoms = chem.molecule_poses(record.mol, opts.hydrogens)[0]
        except chem.ChemError as exc:
            problems.report(where, str(exc))
            continue
        raw = compounds.setdefault(name, _Raw(name, None, where))
        value, hint = _value_of(name, record.properties, opts.target, values)
        if group is None and key is None and not _conflicting(raw.value):
            formula = chem.heavy_formula(record.mol)
            first = titled.setdefault(name, _Titled(formula, value, record.index))
            conflict = _same_title(first, formula, value)
            if conflict is not None:
                problems.report(where, conflict)
                raw.value = _CONFLICT
        if raw.value is None:
            raw.value, raw.hint = value, hint
        if protein is not None:
            atoms = chem.pocket(atoms, protein, opts.pocket_cutoff)
        raw.poses.append(atoms)
        raw.props.append(_pose_numbers(record.properties, opts))
    if values is None and group is None and problems.values:
        _has_properties(path, records, opts.targets)
    return list(compounds.values())


def _has_properties(path: Path, records: list[SdfRecord], names: Sequence[str]) -> None:
    """Refuse a target name that no record of ``path`` has, naming the closest property."""
    from combframe.app.config import did_you_mean

    known = sorted({k for r in records for k in r.properties})
    for name in names:
        if name not in known:
            raise DataError(
                f"{str(path)!r}: no record has the SD property {name!r} of reader.target"
                f"{did_you_mean(name, known)}; its properties: {', '.join(known) or 'none'}"
            )


def _value_of(
    name: str, props: dict[str, str], target: str | list[str] | None, values: _Values | None
) -> tuple[Value | None, str]:
    """Return the value of compound ``name`` and, if it has none, a hint.

    Several targets: each SD property of the list (absent: no value for that target).
    """
    if values is not None:
        return values.get(name)
    if isinstance(target, list):
        return _present(tuple(_number(props[t]) if t in props else None for t in target)), ""
    if not target:
        return None, ""
    if target in props:
        return _number(props[target]), ""
    from combframe.app.config import did_you_mean

    close = did_you_mean(target, list(props))
    return None, f" (no SD property {target}{close})" if close else ""


def _pose_numbers(props: dict[str, str], opts: ReaderConfig) -> dict[str, float]:
    """Every numeric SD property but the target and the grouping one."""
    skip = {*opts.targets, opts.target if isinstance(opts.target, str) else None, opts.group_by}
    numbers = {k: _number(v) for k, v in props.items() if k not in skip}
    return {k: v for k, v in numbers.items() if v is not None}


def _smiles_rows(
    path: Path, opts: ReaderConfig, required: bool = True
) -> list[tuple[str, str, Value | None]]:
    """``(name, smiles, value)`` per line of a ``.smi`` (SMILES name) or a CSV with a header."""
    if path.suffix.lower() == ".smi":
        if opts.targets and opts.values is None:
            raise DataError(
                f"{str(path)!r}: a .smi file holds one value per line; for several targets "
                "use a SMILES CSV with a column per target, or give reader.values=<CSV> "
                "with a name column and a column per target"
            )
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise DataError(f"cannot read {str(path)!r}: {exc.strerror}") from None
        parts = [line.split() for line in lines if line.strip() and not line.startswith("#")]
        return [
            (p[1] if len(p) > 1 else f"line {i + 1}", p[0], _number(p[2]) if len(p) > 2 else None)
            for i, p in enumerate(parts)
        ]
    rows = _read_csv(path)
    if rows and "smiles" not in rows[0]:
        raise DataError(f"{str(path)!r}: a SMILES CSV needs a 'smiles' column; got {list(rows[0])}")
    if opts.values is None and required:
        _has_columns(path, rows, opts.targets)
    names = opts.targets or [opts.target if isinstance(opts.target, str) else "value"]
    return [
        (
            r.get("name") or r.get("compound") or f"row {i + 2}",
            r["smiles"],
            _row_value(r, opts.targets) if opts.targets else _number(r.get(names[0].lower(), "")),
        )
        for i, r in enumerate(rows)
    ]


def _repeated_names(
    path: Path, rows: list[tuple[str, str, Value | None]], problems: _Problems
) -> set[str]:
    """Report each name on two rows that differ (SMILES or value); return those names."""
    first: dict[str, int] = {}
    bad: set[str] = set()
    for index, (name, smiles, value) in enumerate(rows):
        seen = first.setdefault(name, index)
        if seen != index and rows[seen][1:] != (smiles, value) and name not in bad:
            bad.add(name)
            problems.report(
                f"{str(path)!r}: records {seen} and {index} (compound {name!r})",
                "two rows of one name with different SMILES or values; rename one",
            )
    return bad


def _conformers(
    path: Path, opts: ReaderConfig, problems: _Problems, values: _Values | None
) -> list[_Raw]:
    import combframe.app.chem as chem

    rows = _smiles_rows(_check_file(path, "SMILES file"), opts, problems.values)
    bad = _repeated_names(path, rows, problems)
    names = {row[0]: i for i, row in reversed(list(enumerate(rows)))}
    keep = [i for i, row in enumerate(rows) if row[0] not in bad and names[row[0]] == i]
    out: list[_Raw] = []
    for index in (keep[i] for i in _spread(len(keep), opts.limit)):
        problems.check()
        name, smiles, value = rows[index]
        where = f"{str(path)!r}: record {index} (compound {name!r})"
        value, hint = values.get(name) if values is not None else (value, "")
        try:
            poses, fields, problem = chem.conformer_ensemble(
                smiles, opts.conformers, opts.conformer_seed, opts.minimize, opts.hydrogens
            )
        except chem.ChemError as exc:
            problems.report(where, str(exc))
            continue
        missing = {MMFF_ENERGY: f"{problem}; it was not minimised"} if problem else {}
        out.append(_Raw(name, value, where, poses, fields, hint, missing))
    return out


@dataclass(frozen=True)
class _Entry:
    """One compound of a manifest: its value, pose files and optional protein."""

    name: str
    value: Value | None
    poses: tuple[Path, ...]
    protein: Path | None
    where: str


def _manifest(
    path: Path, problems: _Problems | None = None, names: Sequence[str] = ()
) -> list[_Entry]:
    """``compound,value,poses[,protein]`` rows; ``;`` separates pose files of one row.

    With several target ``names`` their columns replace ``value``. Rows of one compound
    add poses; different values on them are reported to ``problems`` (the compound is
    then left out); a row without a value takes the other's.
    """
    rows = _read_csv(_check_file(path, "manifest"))
    if rows and not {"compound", "poses"} <= set(rows[0]):
        raise DataError(
            f"{str(path)!r}: a manifest needs columns compound, value, poses "
            f"(and optionally protein); got {list(rows[0])}"
        )
    if problems is not None and problems.values:
        _has_columns(path, rows, names)
    base = path.parent
    entries: dict[str, _Entry] = {}
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        name = row["compound"]
        files = tuple(base / p.strip() for p in row["poses"].split(";") if p.strip())
        protein = base / row["protein"] if row.get("protein") else None
        old = entries.get(name)
        value = _row_value(row, names)
        if old is None:
            first[name] = i + 2
            where = f"{str(path)!r}: row {i + 2} (compound {name!r})"
            entries[name] = _Entry(name, value, files, protein, where)
            continue
        if value is not None and old.value is not None and value != old.value:
            if problems is not None and not _conflicting(old.value):
                problems.report(
                    f"{str(path)!r}: rows {first[name]} and {i + 2} (compound {name!r})",
                    f"two values, {_text(old.value)} and {_text(value)}; keep one",
                )
            value = _CONFLICT
        value = old.value if value is None else value
        entries[name] = _Entry(name, value, (*old.poses, *files), protein, old.where)
    return list(entries.values())


def _from_entries(entries: Iterable[_Entry], opts: ReaderConfig, problems: _Problems) -> list[_Raw]:
    """Read each entry's pose files (every record a pose of that compound)."""
    import combframe.app.chem as chem

    out: list[_Raw] = []
    proteins: dict[Path, Atoms] = {}
    for entry in entries:
        problems.check()
        if _conflicting(entry.value):
            continue  # reported by _manifest
        missing = [p for p in (*entry.poses, entry.protein) if p is not None and not p.is_file()]
        if missing or not entry.poses:
            problems.report(
                entry.where,
                f"pose file {str(missing[0])!r} does not exist"
                if missing
                else "names no pose file",
            )
            continue
        protein = None
        if entry.protein is not None:
            try:
                if entry.protein not in proteins:
                    proteins[entry.protein] = chem.read_protein(entry.protein, opts.hydrogens)
            except chem.ChemError as exc:
                problems.report(entry.where, f"protein {str(entry.protein)!r}: {exc}")
                continue
            protein = proteins[entry.protein]
        raw = _Raw(entry.name, entry.value, entry.where)
        for pose_file in entry.poses:
            for part in _sdf(pose_file, opts, problems, None, protein, group=entry.name):
                raw.poses += part.poses
                raw.props += part.props
        if raw.poses:
            out.append(raw)
    return out


# ---- built-in sets -------------------------------------------------------------------


def _package_path(package: str, *parts: str) -> Path:
    """Locate ``parts`` inside the installed ``package`` (never a hard-coded path)."""
    try:
        node = resources.files(package)
    except ModuleNotFoundError:
        raise DataError(
            f"this built-in set ships inside the {package} package, which is not "
            "installed: pip install 'combframe[chem]'"
        ) from None
    for part in parts:
        node = node / part
    return Path(str(node))


def _package_file(package: str, *parts: str) -> Path:
    path = _package_path(package, *parts)
    if not path.is_file():
        raise DataError(f"the installed {package} has no {'/'.join(parts)}; reinstall it")
    return path


def _posebusters(opts: ReaderConfig, problems: _Problems) -> tuple[list[_Raw], list[Path]]:
    import combframe.app.chem as chem

    root = _package_path("posebusters", "datasets", "pdb")
    entries, files = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        code = folder.name
        poses = (folder / f"{code}_ligands.sdf", folder / f"{code}_ligand.sdf")
        protein = folder / f"{code}_protein_one_lig_removed.pdb"
        first = next(chem.sdf_records(_check_file(poses[0], "SDF")))
        value = chem.ligand_logp(first.mol) if first.mol is not None else None
        entries.append(_Entry(code, value, poses, protein, f"posebusters {code}"))
        files += [*poses, protein]
    return _from_entries(entries, opts, problems), files


def _built_in(name: str, opts: ReaderConfig, problems: _Problems) -> Callable[[], list[_Raw]]:
    """Return the reader of a built-in set, with its options fixed."""
    if name == "posebusters":
        return lambda: _posebusters(opts, problems)[0]
    folder = ("Contrib", "FreeWilson", "data")
    if name == "cmet":
        sdf = _package_file("rdkit", *folder, "cmet_ligands.sdf")
        fixed = opts.model_copy(update={"target": "r_exp_dg", "group_by": None})
        return lambda: _sdf(sdf, fixed, problems, None, None)
    smi = _package_file("rdkit", *folder, "CHEMBL2321810.smi")
    act = _read_values(_package_file("rdkit", *folder, "CHEMBL2321810_act.csv"), problems)
    return lambda: _conformers(smi, opts, problems, act)


def _built_in_files(name: str) -> list[Path]:
    folder = ("Contrib", "FreeWilson", "data")
    if name == "cmet":
        return [_package_file("rdkit", *folder, "cmet_ligands.sdf")]
    if name == "chembl":
        return [
            _package_file("rdkit", *folder, f)
            for f in ("CHEMBL2321810.smi", "CHEMBL2321810_act.csv")
        ]
    root = _package_path("posebusters", "datasets", "pdb")
    return sorted(p for p in root.rglob("*") if p.is_file())


# ---- files to raw compounds ----------------------------------------------------------


def _is_manifest(path: Path) -> bool:
    if path.suffix.lower() != ".csv":
        return False
    try:
        with path.open(encoding="utf-8") as handle:
            header = handle.readline().lower()
    except (OSError, UnicodeDecodeError):
        return False
    return "poses" in [h.strip() for h in header.split(",")]


def _inputs(source: str, opts: ReaderConfig) -> list[Path]:
    """Every file whose contents the compounds depend on (the cache key hashes them)."""
    if source in BUILT_IN:
        return _built_in_files(source)
    path = _check_file(Path(source), "data file")
    for key, option in (("reader.values", opts.values), ("reader.protein", opts.protein)):
        if option is not None and not option.is_file():
            raise DataError(f"file {str(option)!r} does not exist or is not a file", key)
    extra = [p for p in (opts.values, opts.protein) if p is not None]
    if _is_manifest(path):
        for entry in _manifest(path):
            extra += [p for p in (*entry.poses, entry.protein) if p is not None and p.is_file()]
    return [path, *extra]


def _read_raw(
    source: str, opts: ReaderConfig, problems: _Problems, values_needed: bool = True
) -> list[_Raw]:
    import combframe.app.chem as chem

    if source in BUILT_IN:
        if opts.targets:
            raise DataError(
                f"built-in {source}: has one value per compound; a list reader.target "
                "(several targets) needs a file with a column or SD property per target"
            )
        return _built_in(source, opts, problems)()
    path = Path(source)
    values = None
    if opts.values is not None:
        values = _read_values(opts.values, problems, opts.targets)
    if path.suffix.lower() == ".sdf":
        protein = None
        if opts.protein is not None:
            try:
                protein = chem.read_protein(opts.protein, opts.hydrogens)
            except chem.ChemError as exc:
                raise DataError(f"{str(opts.protein)!r}: {exc}", "reader.protein") from None
        if values is None and opts.target is None and values_needed:
            raise DataError(
                f"{source!r}: say where the values are: reader.target=<SD property> or "
                "reader.values=<CSV of name,value>"
            )
        return _sdf(path, opts, problems, values, protein)
    if _is_manifest(path):
        return _from_entries(_manifest(path, problems, opts.targets), opts, problems)
    return _conformers(path, opts, problems, values)


def _checked(
    raws: list[_Raw], opts: ReaderConfig, problems: _Problems, source: str, values_needed: bool
) -> list[_Raw]:
    """Drop (or refuse) compounds without a value if needed; keep ``limit``; need two."""
    kept = []
    for raw in raws:
        if _conflicting(raw.value):
            continue  # reported where the conflict was found
        if raw.value is None and values_needed:
            problems.report(
                raw.where, f"has no value (a finite number) for this compound{raw.hint}"
            )
        else:
            kept.append(raw)
    kept = [kept[i] for i in _spread(len(kept), opts.limit)]
    if len(kept) < (2 if values_needed else 1):
        what = "training needs 2" if values_needed else "nothing to predict"
        raise DataError(f"{source}: {len(kept)} usable compound(s); {what}")
    return kept


# ---- the cache -----------------------------------------------------------------------


def _pack(
    raws: list[_Raw], skipped: list[str], source: str, key: str, width: int = 0
) -> dict[str, Any]:
    """Flatten the compounds into a few tensors and a JSON string (with the cache ``key``)."""
    import numpy as np

    poses = [p for r in raws for p in r.poses]
    names = sorted({k for r in raws for d in r.props for k in d})
    props = [[d.get(k, math.nan) for k in names] for r in raws for d in r.props]
    meta = {
        "names": [r.name for r in raws],
        "properties": names,
        "missing": [r.missing for r in raws],
        "skipped": skipped,
        "key": key,
    }
    return {
        "pos": torch.from_numpy(np.concatenate([p.pos for p in poses])),
        "z": torch.from_numpy(np.concatenate([p.z for p in poses])),
        "lig": torch.from_numpy(np.concatenate([p.lig for p in poses])),
        "atoms": torch.tensor([len(p.z) for p in poses]),
        "poses": torch.tensor([len(r.poses) for r in raws]),
        "target": torch.tensor([_numbers(r.value, width) for r in raws], dtype=torch.float64),
        "props": torch.tensor(props, dtype=torch.float64).reshape(len(poses), len(names)),
        "meta": json.dumps({**meta, "source": source, "version": _CACHE_VERSION}),
    }


def _numbers(value: Value | None, width: int) -> float | list[float]:
    """Return a value as the cache stores it: NaN where none; ``width`` targets (0: one)."""
    if width and not isinstance(value, tuple):
        return [math.nan] * width  # a compound to predict, without values
    if isinstance(value, tuple):
        return [math.nan if v is None else v for v in value]
    return math.nan if value is None else value


def _unpack(packed: dict[str, Any], dtype: torch.dtype) -> tuple[list[Compound], list[str]]:
    """Build the compounds of :func:`_pack`'s tensors: ``Data`` poses in ``dtype``."""
    Data = import_quietly("torch_geometric.data").Data
    meta = json.loads(packed["meta"])
    atoms = packed["atoms"].tolist()
    pos = torch.split(packed["pos"].to(dtype), atoms)
    z, lig = torch.split(packed["z"], atoms), torch.split(packed["lig"], atoms)
    props: Tensor = packed["props"].to(dtype)
    poses = [Data(pos=p, z=zz, lig=ll) for p, zz, ll in zip(pos, z, lig, strict=True)]
    if props.shape[1]:
        for i, pose in enumerate(poses):
            pose.props = props[i : i + 1]
    compounds, start = [], 0
    for c, count in enumerate(packed["poses"].tolist()):
        block = props[start : start + count]
        compounds.append(
            Compound(
                poses=tuple(poses[start : start + count]),
                target=packed["target"][c].to(dtype),
                name=meta["names"][c],
                properties={k: block[:, j] for j, k in enumerate(meta["properties"])},
                missing=meta["missing"][c] or None,
            )
        )
        start += count
    return compounds, list(meta["skipped"])


def _cache_key(source: str, opts: ReaderConfig, files: list[Path], values_needed: bool) -> str:
    import rdkit

    digest = hashlib.sha256()
    settings = opts.model_dump(mode="json", exclude={"cache", "cache_dir"})
    text = json.dumps(
        [source, settings, values_needed, rdkit.__version__, _CACHE_VERSION], sort_keys=True
    )
    digest.update(text.encode())
    for path in files:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:32]


def cache_dir(opts: ReaderConfig) -> Path:
    """``reader.cache_dir``, else ``$XDG_CACHE_HOME/combframe`` (``~/.cache/combframe``)."""
    if opts.cache_dir is not None:
        return opts.cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "combframe"


def _load_cached(path: Path, key: str) -> dict[str, Any] | None:
    """Return the cached tensors at ``path``; None if absent, unreadable or not ``key``'s.

    An entry whose stored key is not ``key`` (one copied over another's name) is treated
    as corrupt: rebuilt.
    """
    try:
        packed = torch.load(path, map_location="cpu", weights_only=True)
        stored = json.loads(packed["meta"]).get("key")
    except Exception:  # any unreadable entry (truncated, foreign, unpicklable) is rebuilt
        return None
    return packed if isinstance(packed, dict) and stored == key else None


def _store(path: Path, packed: dict[str, Any]) -> None:
    """Write ``packed`` to ``path`` atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    atomic_write(path, buffer.getvalue())


def read_molecules(
    source: str, opts: ReaderConfig, dtype: torch.dtype, *, values: bool = True
) -> MoleculeSet:
    """Read the compounds of ``source`` (a file or a :data:`BUILT_IN` name), cached.

    With ``values=False`` (for prediction) a compound without a value is kept, its
    target NaN.

    Raises
    ------
    DataError
        One line naming the file, the record and the compound, for a missing file, an
        unreadable record, a molecule RDKit rejects, a compound without a value or with
        conflicting entries (unless ``opts.skip_invalid``), fewer than two compounds, or
        missing RDKit.
    ReadInterruptedError
        On SIGINT or SIGTERM while reading (nothing is cached).
    """
    label = f"built-in {source}" if source in BUILT_IN else source
    with stop_on_signals() as stop:  # from the imports to the last record
        problems = _Problems(opts.skip_invalid, stop, values)
        require_chem()
        key = _cache_key(source, opts, _inputs(source, opts), values)
        path = cache_dir(opts) / f"{key}.pt"
        packed = _load_cached(path, key) if opts.cache else None
        if packed is None:
            raws = _read_raw(source, opts, problems, values)
            raws = _checked(raws, opts, problems, label, values)
        problems.check()
    if packed is None:
        packed = _pack(raws, problems.lines, label, key, len(opts.targets))
        if opts.cache:
            _store(path, packed)
    compounds, skipped = _unpack(packed, dtype)
    return MoleculeSet(compounds, tuple(skipped), label)

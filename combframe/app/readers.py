"""Molecular inputs of ``combframe train``: files or a built-in set to compounds of poses.

:func:`read_molecules` reads one of the formats of ``docs/data.md`` (a multi-record SDF,
SDF poses in a protein's pocket, a CSV manifest of pose files, SMILES with generated
conformers) or a built-in set by name (:data:`BUILT_IN`), and returns compounds whose
poses are PyTorch Geometric ``Data`` with ``pos`` (n, 3), ``z`` (n,) and ``lig`` (n,):

    files -> records (RDKit, :mod:`combframe.app.chem`) -> atoms per pose -> cache -> Data

The atoms are cached on disk, keyed by a hash of every input file's contents, the
options and the RDKit version, in a file that :func:`torch.load` reads with
``weights_only=True`` (no pickle); it is written to a temporary name and renamed, so an
error leaves no half-written entry. A record that cannot be used stops the read with one
line naming the file, the record and the compound, or with ``skip_invalid`` is counted.

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
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from combframe.app.checkpoint import atomic_write
from combframe.app.data import Compound, DataError

if TYPE_CHECKING:
    from combframe.app.chem import Atoms
    from combframe.app.config import ReaderConfig

__all__ = [
    "BUILT_IN",
    "MoleculeSet",
    "import_quietly",
    "is_molecular",
    "read_molecules",
    "require_chem",
]

#: Bumped when the cached layout or the featurisation changes.
_CACHE_VERSION = 2

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


@dataclass
class _Raw:
    """One compound before caching: its poses' atoms and per-pose numbers."""

    name: str
    value: float | None
    where: str
    poses: list[Atoms] = field(default_factory=list)
    props: list[dict[str, float]] = field(default_factory=list)


class _Problems:
    """Raise each problem, or count it when ``skip`` (``skip_invalid``)."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.lines: list[str] = []

    def report(self, where: str, problem: str) -> None:
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


def _read_values(path: Path) -> dict[str, float]:
    """Read a CSV of ``name,value`` rows (a header first): the value of each compound."""
    rows = _read_csv(path)
    values: dict[str, float] = {}
    for i, row in enumerate(rows):
        cells = list(row.values())
        value = _number(cells[1]) if len(cells) >= 2 else None
        if value is None:
            raise DataError(f"{str(path)!r}: row {i + 2}: expected name,value; got {cells}")
        values[cells[0]] = value
    return values


def _spread(count: int, limit: int | None) -> list[int]:
    """Pick ``limit`` of ``count`` indices spread evenly over them (all if None)."""
    if limit is None or limit >= count:
        return list(range(count))
    return [i * count // limit for i in range(limit)]


def _check_file(path: Path, role: str) -> Path:
    if not path.is_file():
        raise DataError(f"{role} {str(path)!r} does not exist or is not a file")
    return path


def _sdf(
    path: Path,
    opts: ReaderConfig,
    problems: _Problems,
    values: dict[str, float] | None,
    protein: Atoms | None,
    group: str | None = None,
) -> list[_Raw]:
    """Group the records of ``path`` into compounds (``group`` names all of them)."""
    import combframe.app.chem as chem

    compounds: dict[str, _Raw] = {}
    try:
        records = list(chem.sdf_records(_check_file(path, "SDF")))
    except chem.ChemError as exc:
        raise DataError(f"{str(path)!r}: {exc}") from None
    for record in records:
        key = opts.group_by
        name = group or (record.properties.get(key, "") if key else record.title)
        where = f"{str(path)!r}: record {record.index} (compound {name!r})"
        if record.mol is None:
            problems.report(where, "RDKit cannot read or sanitize this record")
            continue
        if not name:
            problems.report(where, f"has no {'property ' + key if key else 'name'} to group by")
            continue
        try:
            atoms = chem.molecule_poses(record.mol, opts.hydrogens)[0]
        except chem.ChemError as exc:
            problems.report(where, str(exc))
            continue
        raw = compounds.setdefault(name, _Raw(name, None, where))
        if raw.value is None:
            raw.value = _value_of(name, record.properties, opts.target, values)
        if protein is not None:
            atoms = chem.pocket(atoms, protein, opts.pocket_cutoff)
        raw.poses.append(atoms)
        raw.props.append(_pose_numbers(record.properties, opts))
    return list(compounds.values())


def _value_of(
    name: str, props: dict[str, str], target: str | None, values: dict[str, float] | None
) -> float | None:
    if values is not None:
        return values.get(name)
    return _number(props[target]) if target and target in props else None


def _pose_numbers(props: dict[str, str], opts: ReaderConfig) -> dict[str, float]:
    """Every numeric SD property but the target and the grouping one."""
    skip = {opts.target, opts.group_by}
    numbers = {k: _number(v) for k, v in props.items() if k not in skip}
    return {k: v for k, v in numbers.items() if v is not None}


def _smiles_rows(path: Path, opts: ReaderConfig) -> list[tuple[str, str, float | None]]:
    """``(name, smiles, value)`` per line of a ``.smi`` (SMILES name) or a CSV with a header."""
    if path.suffix.lower() == ".smi":
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
    column = (opts.target or "value").lower()
    if rows and "smiles" not in rows[0]:
        raise DataError(f"{str(path)!r}: a SMILES CSV needs a 'smiles' column; got {list(rows[0])}")
    return [
        (
            r.get("name") or r.get("compound") or f"row {i + 2}",
            r["smiles"],
            _number(r.get(column, "")),
        )
        for i, r in enumerate(rows)
    ]


def _conformers(
    path: Path, opts: ReaderConfig, problems: _Problems, values: dict[str, float] | None
) -> list[_Raw]:
    import combframe.app.chem as chem

    rows = _smiles_rows(_check_file(path, "SMILES file"), opts)
    out: list[_Raw] = []
    for index in _spread(len(rows), opts.limit):
        name, smiles, value = rows[index]
        where = f"{str(path)!r}: record {index} (compound {name!r})"
        value = values.get(name) if values is not None else value
        try:
            poses = chem.conformer_poses(
                smiles, opts.conformers, opts.conformer_seed, opts.minimize, opts.hydrogens
            )
        except chem.ChemError as exc:
            problems.report(where, str(exc))
            continue
        out.append(_Raw(name, value, where, poses, [{} for _ in poses]))
    return out


@dataclass(frozen=True)
class _Entry:
    """One compound of a manifest: its value, pose files and optional protein."""

    name: str
    value: float | None
    poses: tuple[Path, ...]
    protein: Path | None
    where: str


def _manifest(path: Path) -> list[_Entry]:
    """``compound,value,poses[,protein]`` rows; ``;`` separates pose files of one row."""
    rows = _read_csv(_check_file(path, "manifest"))
    if rows and not {"compound", "poses"} <= set(rows[0]):
        raise DataError(
            f"{str(path)!r}: a manifest needs columns compound, value, poses "
            f"(and optionally protein); got {list(rows[0])}"
        )
    base = path.parent
    entries: dict[str, _Entry] = {}
    for i, row in enumerate(rows):
        name = row["compound"]
        files = tuple(base / p.strip() for p in row["poses"].split(";") if p.strip())
        protein = base / row["protein"] if row.get("protein") else None
        where = f"{str(path)!r}: row {i + 2} (compound {name!r})"
        old = entries.get(name)
        value = _number(row.get("value", ""))
        entries[name] = _Entry(
            name,
            value,
            (*old.poses, *files) if old else files,
            protein,
            old.where if old else where,
        )
    return list(entries.values())


def _from_entries(entries: Iterable[_Entry], opts: ReaderConfig, problems: _Problems) -> list[_Raw]:
    """Read each entry's pose files (every record a pose of that compound)."""
    import combframe.app.chem as chem

    out: list[_Raw] = []
    proteins: dict[Path, Atoms] = {}
    for entry in entries:
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
            for part in _sdf(pose_file, opts, problems, {}, protein, group=entry.name):
                raw.poses += part.poses
                raw.props += part.props
        if raw.poses:
            out.append(raw)
    return out


# ---- built-in sets -------------------------------------------------------------------


def _package_path(package: str, *parts: str) -> Path:
    """Locate ``parts`` inside the installed ``package`` (never a hard-coded path)."""
    node = resources.files(package)
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
    act = _read_values(_package_file("rdkit", *folder, "CHEMBL2321810_act.csv"))
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
    extra = [p for p in (opts.values, opts.protein) if p is not None]
    if _is_manifest(path):
        for entry in _manifest(path):
            extra += [p for p in (*entry.poses, entry.protein) if p is not None and p.is_file()]
    return [path, *(_check_file(p, "file") for p in extra)]


def _read_raw(
    source: str, opts: ReaderConfig, problems: _Problems, values_needed: bool = True
) -> list[_Raw]:
    import combframe.app.chem as chem

    if source in BUILT_IN:
        return _built_in(source, opts, problems)()
    path = Path(source)
    values = _read_values(opts.values) if opts.values is not None else None
    if path.suffix.lower() == ".sdf":
        protein = None
        if opts.protein is not None:
            try:
                protein = chem.read_protein(opts.protein, opts.hydrogens)
            except chem.ChemError as exc:
                raise DataError(f"reader.protein {str(opts.protein)!r}: {exc}") from None
        if values is None and opts.target is None and values_needed:
            raise DataError(
                f"{source!r}: say where the values are: reader.target=<SD property> or "
                "reader.values=<CSV of name,value>"
            )
        return _sdf(path, opts, problems, values, protein)
    if _is_manifest(path):
        return _from_entries(_manifest(path), opts, problems)
    return _conformers(path, opts, problems, values)


def _checked(
    raws: list[_Raw], opts: ReaderConfig, problems: _Problems, source: str, values_needed: bool
) -> list[_Raw]:
    """Drop (or refuse) compounds without a value if needed; keep ``limit``; need two."""
    kept = []
    for raw in raws:
        if raw.value is None and values_needed:
            problems.report(raw.where, "has no value (a finite number) for this compound")
        else:
            kept.append(raw)
    kept = [kept[i] for i in _spread(len(kept), opts.limit)]
    if len(kept) < (2 if values_needed else 1):
        what = "training needs 2" if values_needed else "nothing to predict"
        raise DataError(f"{source}: {len(kept)} usable compound(s); {what}")
    return kept


# ---- the cache -----------------------------------------------------------------------


def _pack(raws: list[_Raw], skipped: list[str], source: str) -> dict[str, Any]:
    """Flatten the compounds into a few tensors and a JSON string."""
    import numpy as np

    poses = [p for r in raws for p in r.poses]
    names = sorted({k for r in raws for d in r.props for k in d})
    props = [[d.get(k, math.nan) for k in names] for r in raws for d in r.props]
    meta = {"names": [r.name for r in raws], "properties": names, "skipped": skipped}
    return {
        "pos": torch.from_numpy(np.concatenate([p.pos for p in poses])),
        "z": torch.from_numpy(np.concatenate([p.z for p in poses])),
        "lig": torch.from_numpy(np.concatenate([p.lig for p in poses])),
        "atoms": torch.tensor([len(p.z) for p in poses]),
        "poses": torch.tensor([len(r.poses) for r in raws]),
        "target": torch.tensor(
            [math.nan if r.value is None else r.value for r in raws], dtype=torch.float64
        ),
        "props": torch.tensor(props, dtype=torch.float64).reshape(len(poses), len(names)),
        "meta": json.dumps({**meta, "source": source, "version": _CACHE_VERSION}),
    }


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


def _load_cached(path: Path) -> dict[str, Any] | None:
    """Return the cached tensors at ``path``; None if absent or unreadable (rebuilt then)."""
    try:
        packed = torch.load(path, map_location="cpu", weights_only=True)
        json.loads(packed["meta"])
    except Exception:  # any unreadable entry (truncated, foreign, unpicklable) is rebuilt
        return None
    return packed if isinstance(packed, dict) else None


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
        unreadable record, a molecule RDKit rejects or a compound without a value
        (unless ``opts.skip_invalid``), fewer than two compounds, or missing RDKit.
    """
    require_chem()
    label = f"built-in {source}" if source in BUILT_IN else source
    key = _cache_key(source, opts, _inputs(source, opts), values)
    path = cache_dir(opts) / f"{key}.pt"
    packed = _load_cached(path) if opts.cache else None
    if packed is None:
        problems = _Problems(opts.skip_invalid)
        raws = _read_raw(source, opts, problems, values)
        raws = _checked(raws, opts, problems, label, values)
        packed = _pack(raws, problems.lines, label)
        if opts.cache:
            _store(path, packed)
    compounds, skipped = _unpack(packed, dtype)
    return MoleculeSet(compounds, tuple(skipped), label)

"""RDKit-based reading of molecules: SDF records, protein atoms, generated conformers.

Everything here needs the ``chem`` extra (RDKit); :mod:`combframe.app.readers` imports
this module only when a molecular input is read, through :func:`require_chem`. A pose is
returned as plain arrays (:class:`Atoms`): coordinates, atomic numbers and a ligand flag
per atom; :mod:`combframe.app.readers` groups them into compounds and caches them.
"""

from __future__ import annotations

import logging
import math
import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rdkit import Chem, RDLogger, rdBase
from rdkit.Chem import AllChem as _AllChem
from rdkit.Chem import Crippen as _Crippen
from rdkit.Chem import rdFingerprintGenerator

from combframe.app.data import MMFF_ENERGY
from combframe.errors import CombframeError

# RDKit's bundled stubs leave out many functions these modules export.
AllChem: Any = _AllChem
Crippen: Any = _Crippen

__all__ = [
    "Atoms",
    "ChemError",
    "SdfRecord",
    "conformer_ensemble",
    "conformer_poses",
    "heavy_formula",
    "ligand_logp",
    "molecule_poses",
    "morgan_fingerprints",
    "pocket",
    "read_protein",
    "sdf_records",
]

RDLogger.DisableLog("rdApp.*")  # type: ignore[attr-defined]  # absent from the stubs  # rejections are reported as DataError lines instead


class ChemError(CombframeError, ValueError):
    """A molecule RDKit cannot use; the message says what is wrong with it."""


@dataclass(frozen=True)
class Atoms:
    """The atoms of one pose: ``pos`` (n, 3) in Å, ``z`` (n,) and ``lig`` (n,) bool."""

    pos: np.ndarray
    z: np.ndarray
    lig: np.ndarray


@dataclass(frozen=True)
class SdfRecord:
    """One record of an SDF: its index, title, molecule (None if unreadable), properties."""

    index: int
    title: str
    mol: Any
    properties: dict[str, str]


def sdf_records(path: Path) -> Iterator[SdfRecord]:
    """Yield every record of the SDF ``path``, hydrogens kept, unreadable ones as None.

    Raises
    ------
    ChemError
        If RDKit cannot open the file as an SDF at all (empty, not an SDF).
    """
    try:
        supplier = Chem.SDMolSupplier(str(path), removeHs=False, sanitize=True)
    except OSError as exc:  # an empty or unreadable file
        raise ChemError(f"RDKit cannot read it as an SDF file ({exc})") from None
    for index in range(len(supplier)):
        text = supplier.GetItemText(index)
        title = text.splitlines()[0].strip() if text.strip() else ""
        mol = supplier[index]
        props = {} if mol is None else {k: str(v) for k, v in mol.GetPropsAsDict().items()}
        yield SdfRecord(index, title, mol, props)


def _atoms(mol: Any, conf_id: int, hydrogens: bool) -> Atoms:
    if not hydrogens:
        mol = Chem.RemoveHs(mol, sanitize=False)
    if mol.GetNumConformers() == 0:
        raise ChemError("has no coordinates")
    pos = np.asarray(mol.GetConformer(conf_id).GetPositions(), dtype=np.float64)
    if mol.GetConformer(conf_id).Is3D() is False and np.allclose(pos[:, 2], 0.0):
        raise ChemError("has 2D coordinates only; poses need 3D coordinates")
    if not np.isfinite(pos).all():
        raise ChemError("has non-finite coordinates")
    z = np.asarray([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    if len(z) == 0:
        raise ChemError("has no atoms")
    return Atoms(pos, z, np.ones(len(z), dtype=bool))


def molecule_poses(mol: Any, hydrogens: bool) -> list[Atoms]:
    """One pose per conformer of ``mol`` (ligand atoms only)."""
    return [_atoms(mol, c.GetId(), hydrogens) for c in mol.GetConformers()]


def read_protein(path: Path, hydrogens: bool) -> Atoms:
    """Read a protein PDB's atoms (waters left out), all flagged as not ligand."""
    mol = Chem.MolFromPDBFile(
        str(path), sanitize=False, removeHs=not hydrogens, proximityBonding=False
    )
    if mol is None or mol.GetNumAtoms() == 0:
        raise ChemError("RDKit cannot read it as a PDB file (no atoms)")
    keep = [
        a.GetIdx()
        for a in mol.GetAtoms()
        if a.GetPDBResidueInfo() is None or a.GetPDBResidueInfo().GetResidueName() != "HOH"
    ]
    keep = [i for i in keep if hydrogens or mol.GetAtomWithIdx(i).GetAtomicNum() != 1]
    pos = np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64)[keep]
    z = np.asarray([mol.GetAtomWithIdx(i).GetAtomicNum() for i in keep], dtype=np.int64)
    return Atoms(pos, z, np.zeros(len(z), dtype=bool))


def pocket(ligand: Atoms, protein: Atoms, cutoff: float) -> Atoms:
    """Return the ligand's atoms, then the protein atoms within ``cutoff`` Å of any of them."""
    diff = protein.pos[:, None, :] - ligand.pos[None, :, :]
    near = (np.einsum("pla,pla->pl", diff, diff) <= cutoff * cutoff).any(axis=1)
    return Atoms(
        np.concatenate([ligand.pos, protein.pos[near]]),
        np.concatenate([ligand.z, protein.z[near]]),
        np.concatenate([ligand.lig, protein.lig[near]]),
    )


def heavy_formula(mol: Any) -> str:
    """Return the formula of ``mol``'s heavy atoms (``C6 N1 O2``), whatever its hydrogens."""
    counts = Counter(a.GetSymbol() for a in mol.GetAtoms() if a.GetAtomicNum() > 1)
    return " ".join(f"{k}{counts[k]}" for k in sorted(counts))


class _Collect(logging.Handler):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


@contextmanager
def _rdkit_warnings() -> Iterator[list[str]]:
    """Collect RDKit's warnings during the block, shown nowhere (logs are off otherwise)."""
    seen: list[str] = []
    logger = logging.getLogger("rdkit")
    handlers, propagate = logger.handlers, logger.propagate
    logger.handlers = [_Collect(seen)]  # rdkit's own handler prints to stderr
    logger.propagate = False
    rdBase.LogToPythonLogger()
    RDLogger.EnableLog("rdApp.warning")  # type: ignore[attr-defined]  # absent from the stubs
    try:
        yield seen
    finally:
        RDLogger.DisableLog("rdApp.warning")  # type: ignore[attr-defined]  # absent from the stubs
        rdBase.LogToCppStreams()
        logger.handlers, logger.propagate = handlers, propagate


def _embed(mol: Any, count: int, params: Any) -> list[int]:
    """ETKDG conformers of ``mol``; a SIGINT that RDKit caught (giving up) is raised again.

    RDKit handles SIGINT itself while embedding: it stops and returns no conformer, and
    Python never sees the signal. Raising it again lets the caller's handler (or
    :class:`KeyboardInterrupt`) act on it instead of blaming the molecule.
    """
    with _rdkit_warnings() as seen:
        ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=count, params=params))
    if any("Interrupted" in message for message in seen):
        signal.raise_signal(signal.SIGINT)
    return ids


def _parse_smiles(smiles: str) -> Any:
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ChemError(f"RDKit rejects the SMILES {smiles!r}")
    return mol


def conformer_poses(
    smiles: str, count: int, seed: int, minimize: bool, hydrogens: bool
) -> list[Atoms]:
    """Generate up to ``count`` ETKDG conformers of ``smiles`` (seeded); one pose each.

    Hydrogens are added for the embedding (and the MMFF minimisation, if asked) and
    dropped afterwards unless ``hydrogens``. :func:`conformer_ensemble` also gives each
    conformer's MMFF energy.
    """
    return conformer_ensemble(smiles, count, seed, minimize, hydrogens)[0]


#: Elements MMFF94 has atom types for: organic molecules' and the common ions'.
_MMFF_ORGANIC = ("H", "C", "N", "O", "F", "Si", "P", "S", "Cl", "Br", "I")
_MMFF_ELEMENTS = frozenset((*_MMFF_ORGANIC, "Li", "Na", "K", "Mg", "Ca", "Fe", "Cu", "Zn"))


def _mmff_problem(mol: Any) -> str | None:
    """Say why MMFF94 cannot minimise ``mol`` (None: it has every parameter)."""
    if AllChem.MMFFHasAllMoleculeParams(mol):
        return None
    elements = sorted({a.GetSymbol() for a in mol.GetAtoms()} - _MMFF_ELEMENTS)
    return f"MMFF94 has no parameters for it ({', '.join(elements) or 'an atom type'})"


def conformer_ensemble(
    smiles: str, count: int, seed: int, minimize: bool, hydrogens: bool
) -> tuple[list[Atoms], list[dict[str, float]], str | None]:
    """Return :func:`conformer_poses`'s poses, each conformer's pose fields and a note.

    With ``minimize`` and a molecule MMFF has every parameter for, a conformer's fields
    hold ``mmff_energy``: its MMFF94 energy after minimisation, kcal/mol, relative to the
    compound's lowest conformer (so the lowest is 0); otherwise they are empty, and with
    ``minimize`` the note says why the conformers were not minimised (None otherwise).
    """
    mol = Chem.AddHs(_parse_smiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed + 1  # RDKit embeds every conformer alike for randomSeed=0
    params.numThreads = 1
    ids = _embed(mol, count, params)
    if not ids:
        raise ChemError(f"RDKit could not embed {smiles!r} in 3D (ETKDG found no conformer)")
    fields: list[dict[str, float]] = [{} for _ in ids]
    problem = _mmff_problem(mol) if minimize else None
    if minimize and problem is None:
        done = AllChem.MMFFOptimizeMoleculeConfs(mol, numThreads=1, maxIters=500)
        energies = [float(energy) for _, energy in done]
        if all(math.isfinite(e) for e in energies):
            low = min(energies)
            fields = [{MMFF_ENERGY: e - low} for e in energies]
        else:
            problem = "MMFF94 gave it a non-finite energy"
    return molecule_poses(mol, hydrogens), fields, problem


def ligand_logp(mol: Any) -> float:
    """RDKit's Crippen logP of ``mol``: a computed stand-in where no value was measured."""
    value = float(Crippen.MolLogP(Chem.RemoveHs(mol)))
    return round(value, 4) if math.isfinite(value) else math.nan


def morgan_fingerprints(smiles: list[str], radius: int = 2, bits: int = 2048) -> np.ndarray:
    """Morgan (ECFP-like) bit vectors of ``smiles``, shape ``(len(smiles), bits)``."""
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)
    return np.stack([gen.GetFingerprintAsNumPy(_parse_smiles(s)) for s in smiles]).astype(
        np.float64
    )

"""Molecular input: every reader on small real files, bad input, the cache, the networks.

The files are a few compounds of the data that ships inside RDKit's and posebusters'
wheels (``docs/data.md``); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("rdkit")
pytest.importorskip("torch_geometric")

from rdkit import Chem
from rdkit.Chem import AllChem
from torch_geometric.data import Batch, Data

import combframe
from combframe.app import readers
from combframe.app.cli import main
from combframe.app.config import ConfigError, ReaderConfig, load_config
from combframe.app.models import DataInfo, RadiusGraph, SchNetNetwork, build_network
from combframe.app.train import load_data, train
from combframe.testing import full_graph_gradients, multipose_gradients

RDKIT_DATA = Path(str(resources.files("rdkit").joinpath("Contrib", "FreeWilson", "data")))
PDB = Path(str(resources.files("posebusters").joinpath("datasets", "pdb")))
FAST = ["epochs=1", "plot=false", "model.interactions=1", "hidden=8", "test_fraction=0.34"]


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return f"reader.cache_dir={tmp_path / 'cache'}"


def _cmet(tmp_path: Path, count: int = 4, name: str = "poses.sdf") -> Path:
    """The first ``count`` c-Met ligands, two records per compound, a docking score each."""
    supplier = Chem.SDMolSupplier(str(RDKIT_DATA / "cmet_ligands.sdf"), removeHs=False)
    path = tmp_path / name
    with Chem.SDWriter(str(path)) as writer:
        for i, mol in zip(range(count), supplier, strict=False):
            mol.SetProp("series", f"c{i // 2}")
            mol.SetProp("docking_score", str(-7.0 - i))
            writer.write(mol)
    return path


def _smiles(tmp_path: Path, count: int = 3) -> tuple[Path, Path]:
    lines = (RDKIT_DATA / "CHEMBL2321810.smi").read_text().splitlines()[:count]
    smi = tmp_path / "series.smi"
    smi.write_text("\n".join(lines) + "\n")
    values = tmp_path / "values.csv"
    names = [line.split()[1] for line in lines]
    values.write_text("name,pIC50\n" + "".join(f"{n},{5 + i}\n" for i, n in enumerate(names)))
    return smi, values


def _data(overrides: list[str]) -> Any:
    return load_data(load_config(None, overrides))


# ---- each reader ------------------------------------------------------------------------


def test_sdf_grouped_by_a_property_keeps_the_other_numbers_per_pose(
    tmp_path: Path, cache: str
) -> None:
    path = _cmet(tmp_path)
    data = _data([f"data={path}", "reader.group_by=series", "reader.target=r_exp_dg", cache])
    compounds = sorted((*data.train, *data.test), key=lambda c: str(c.name))
    assert [c.name for c in compounds] == ["c0", "c1"]
    assert [len(c.poses) for c in compounds] == [2, 2]
    pose = compounds[0].poses[0]
    assert isinstance(pose, Data) and pose.pos.shape[1] == 3 and pose.z.dtype == torch.long
    assert bool(pose.lig.all()) and int(pose.z.min()) > 1  # heavy atoms, all ligand
    assert compounds[1].properties is not None
    assert compounds[1].properties["docking_score"].tolist() == [-9.0, -10.0]
    assert "r_exp_dg" not in compounds[1].properties
    assert pose.props.shape == (1, 1)


def test_sdf_values_from_a_csv_and_grouping_by_name(tmp_path: Path, cache: str) -> None:
    path = _cmet(tmp_path, count=3)
    titles = [m.GetProp("_Name") for m in Chem.SDMolSupplier(str(path))]
    values = tmp_path / "v.csv"
    values.write_text("name,dg\n" + "".join(f"{t},{-8 - i}\n" for i, t in enumerate(titles)))
    data = _data([f"data={path}", f"reader.values={values}", cache])
    by_name = {c.name: float(c.target) for c in (*data.train, *data.test)}
    assert by_name == {t: -8.0 - i for i, t in enumerate(titles)}


def test_sdf_poses_in_a_protein_pocket_carry_a_ligand_flag(tmp_path: Path, cache: str) -> None:
    supplier = Chem.SDMolSupplier(str(PDB / "1ia1" / "1ia1_ligands.sdf"), removeHs=False)
    path = tmp_path / "docked.sdf"
    with Chem.SDWriter(str(path)) as writer:
        for i, mol in enumerate(supplier):
            mol.SetProp("_Name", f"pose{i}")
            mol.SetProp("value", str(float(i)))
            writer.write(mol)
    protein = PDB / "1ia1" / "1ia1_protein_one_lig_removed.pdb"
    overrides = [f"data={path}", f"reader.protein={protein}", "reader.target=value", cache]
    compounds = [*_data(overrides).train, *_data(overrides).test]
    pose = compounds[0].poses[0]
    ligand, pocket = pose.pos[pose.lig], pose.pos[~pose.lig]
    assert len(ligand) == 19 and len(pocket) > 20
    assert float(torch.cdist(pocket.double(), ligand.double()).min(1).values.max()) <= 6.0 + 1e-4
    tighter = _data([*overrides, "reader.pocket_cutoff=4"]).train[0].poses[0]
    assert int((~tighter.lig).sum()) < len(pocket)


def _manifest(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text("compound,value,poses,protein\n" + "\n".join(rows) + "\n")
    return path


def test_a_manifest_joins_several_pose_files_per_compound(tmp_path: Path, cache: str) -> None:
    rows = [
        f"1ia1,1.5,{PDB}/1ia1/1ia1_ligands.sdf;{PDB}/1ia1/1ia1_ligand.sdf,"
        f"{PDB}/1ia1/1ia1_protein_one_lig_removed.pdb",
        f"1uou,2.5,{PDB}/1uou/1uou_ligand.sdf,{PDB}/1uou/1uou_protein_one_lig_removed.pdb",
        f"1uou,2.5,{PDB}/1uou/1uou_ligands.sdf,{PDB}/1uou/1uou_protein_one_lig_removed.pdb",
    ]
    data = _data([f"data={_manifest(tmp_path, rows)}", cache])
    by_name = {c.name: c for c in (*data.train, *data.test)}
    assert {k: len(c.poses) for k, c in by_name.items()} == {"1ia1": 3, "1uou": 2}
    assert float(by_name["1uou"].target) == 2.5
    assert all(int((~p.lig).sum()) > 0 for c in by_name.values() for p in c.poses)


@pytest.mark.parametrize("form", ["smi", "csv"])
def test_smiles_get_seeded_conformers(tmp_path: Path, cache: str, form: str) -> None:
    smi, values = _smiles(tmp_path)
    if form == "smi":
        overrides = [f"data={smi}", f"reader.values={values}"]
    else:
        table = tmp_path / "series.csv"
        rows = [line.split() for line in smi.read_text().splitlines()]
        table.write_text("smiles,name,pic50\n" + "".join(f"{s},{n},{5}\n" for s, n in rows))
        overrides = [f"data={table}", "reader.target=pIC50"]
    overrides += ["reader.conformers=3", "reader.minimize=true", cache]
    first, again = _data(overrides), _data([*overrides, "reader.cache=false"])
    pose_sets = [[p.pos for c in d.train for p in c.poses] for d in (first, again)]
    assert len(pose_sets[0]) == 6 and all(
        torch.equal(a, b) for a, b in zip(*pose_sets, strict=True)
    )
    assert len({tuple(p.pos[0].tolist()) for p in first.train[0].poses}) == 3


def test_the_json_of_vectors_still_trains_with_the_mlp(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    compounds = [
        {"name": f"m{i}", "value": float(i), "poses": [[i, 1.0], [0.5, i]]} for i in range(4)
    ]
    path.write_text(json.dumps({"compounds": compounds}))
    config = load_config(None, [f"data={path}", "epochs=1", "plot=false"])
    result = train(config, progress=False, write=False)
    assert result.metrics["data"]["kind"] == "vectors"


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("cmet", ["reader.limit=4"]),
        ("chembl", ["reader.limit=3", "reader.conformers=2"]),
        ("posebusters", ["reader.pocket_cutoff=4"]),
    ],
)
def test_each_built_in_set_trains_by_name_from_the_command_line(
    tmp_path: Path, cache: str, name: str, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", f"data={name}", *FAST, *extra, cache, "strategy=recompute"]
    assert main([*args, f"output_dir={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    assert "held-out" in out
    (run,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"] == {
        "source": f"built-in {name}",
        "kind": "molecules",
        "features": 0,
        "skipped": 0,
    }


def test_every_strategy_trains_molecules_to_the_same_weights(tmp_path: Path, cache: str) -> None:
    path = _cmet(tmp_path)
    base = [f"data={path}", "reader.target=r_exp_dg", *FAST, cache, "dtype=float64"]
    results = [
        train(load_config(None, [*base, f"strategy={s}"]), progress=False, write=False)
        for s in ("store", "recompute", "stream")
    ]
    rmses = [r.metrics["test"]["rmse"] for r in results]
    assert rmses == pytest.approx([rmses[0]] * 3, rel=1e-9)


# ---- bad input --------------------------------------------------------------------------


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        _data(overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_an_unreadable_record_names_file_record_and_compound(tmp_path: Path, cache: str) -> None:
    path = _cmet(tmp_path, count=3)
    blocks = path.read_text().split("$$$$\n")
    lines = blocks[1].splitlines()
    lines[3] = "  9999 bad counts line"
    blocks[1] = "\n".join(lines) + "\n"
    path.write_text("$$$$\n".join(blocks))
    title = lines[0].strip()
    message = _error([f"data={path}", "reader.target=r_exp_dg", cache])
    assert str(path) in message and "record 1" in message and repr(title) in message
    assert "skip_invalid" in message
    data = _data([f"data={path}", "reader.target=r_exp_dg", "reader.skip_invalid=true", cache])
    assert len(data.skipped) == 1 and len((*data.train, *data.test)) == 2


def test_a_molecule_rdkit_rejects_is_named(tmp_path: Path, cache: str) -> None:
    smi, values = _smiles(tmp_path)
    smi.write_text(smi.read_text() + "C1CC(N bad1\n")
    with values.open("a") as handle:
        handle.write("bad1,4.0\n")
    overrides = [f"data={smi}", f"reader.values={values}", "reader.conformers=1", cache]
    message = _error(overrides)
    assert "record 3 (compound 'bad1')" in message and "RDKit rejects" in message
    assert len(_data([*overrides, "reader.skip_invalid=true"]).skipped) == 1
    config = load_config(None, [*overrides, "reader.skip_invalid=true", *FAST])
    notes = train(config, progress=False, write=False).notes
    assert any("left out 1 record(s)" in n and "'bad1'" in n for n in notes), notes


def test_a_compound_without_a_value_is_named(tmp_path: Path, cache: str) -> None:
    smi, values = _smiles(tmp_path)
    kept = values.read_text().splitlines()[:-1]
    values.write_text("\n".join(kept) + "\n")
    missing = smi.read_text().splitlines()[-1].split()[1]
    overrides = [f"data={smi}", f"reader.values={values}", "reader.conformers=1", cache]
    message = _error(overrides)
    assert f"(compound {missing!r}): has no value" in message and str(smi) in message
    data = _data([*overrides, "reader.skip_invalid=true"])
    assert len(data.skipped) == 1 and missing in data.skipped[0]


def test_a_missing_file_is_named(tmp_path: Path, cache: str) -> None:
    assert "does not exist" in _error([f"data={tmp_path / 'nope.sdf'}", cache])
    rows = [
        f"a,1,{PDB}/1ia1/1ia1_ligand.sdf,",
        f"b,2,{PDB}/1uou/1uou_ligand.sdf,",
        f"c,3,{tmp_path}/gone.sdf,",
    ]
    message = _error([f"data={_manifest(tmp_path, rows)}", cache])
    assert "row 4 (compound 'c')" in message and "gone.sdf" in message
    data = _data([f"data={tmp_path / 'manifest.csv'}", "reader.skip_invalid=true", cache])
    assert len(data.skipped) == 1


def test_an_sdf_without_a_value_source_says_where_to_give_one(tmp_path: Path, cache: str) -> None:
    message = _error([f"data={_cmet(tmp_path)}", cache])
    assert "reader.target" in message and "reader.values" in message


def test_without_rdkit_the_app_imports_and_molecules_say_how_to_install() -> None:
    code = (
        "import sys; sys.modules['rdkit'] = None\n"
        "import combframe.app.train, combframe.app.cli, combframe.app.readers\n"
        "from combframe.app.config import load_config\n"
        "try:\n"
        "    combframe.app.train.load_data(load_config(None, ['data=cmet']))\n"
        "except Exception as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'combframe[chem]'" in out.stdout


# ---- the cache ----------------------------------------------------------------------------


def _read(path: Path, tmp_path: Path, **options: Any) -> readers.MoleculeSet:
    opts = ReaderConfig(target="r_exp_dg", cache_dir=tmp_path / "cache", **options)
    return readers.read_molecules(str(path), opts, torch.float32)


def _no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> Any:
        raise AssertionError("read the files again instead of the cache")

    monkeypatch.setattr(readers, "_read_raw", refuse)


def test_a_second_read_comes_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _cmet(tmp_path)
    first = _read(path, tmp_path)
    (entry,) = (tmp_path / "cache").iterdir()
    assert torch.load(entry, weights_only=True)["pos"].dtype == torch.float64
    _no_reading(monkeypatch)
    second = _read(path, tmp_path)
    for a, b in zip(first.compounds, second.compounds, strict=True):
        assert a.name == b.name and torch.equal(a.target, b.target)
        assert all(torch.equal(p.pos, q.pos) for p, q in zip(a.poses, b.poses, strict=True))


def test_changed_contents_or_options_rebuild_the_cache(tmp_path: Path) -> None:
    path = _cmet(tmp_path)
    _read(path, tmp_path)
    _read(path, tmp_path, hydrogens=True)
    path.write_text(path.read_text().replace("-7.0", "-6.5", 1))
    changed = _read(path, tmp_path)
    assert len(list((tmp_path / "cache").iterdir())) == 3
    scores = [float(c.properties["docking_score"][0]) for c in changed.compounds]  # type: ignore[index]  # SDF input has properties
    assert -6.5 in scores


def test_a_failed_write_leaves_no_cache_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _cmet(tmp_path)

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _read(path, tmp_path)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    assert len(_read(path, tmp_path).compounds) == 4


def test_an_unreadable_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    path = _cmet(tmp_path)
    _read(path, tmp_path)
    (entry,) = (tmp_path / "cache").iterdir()
    entry.write_bytes(b"not a tensor file")
    assert len(_read(path, tmp_path).compounds) == 4
    assert torch.load(entry, weights_only=True)["z"].dtype == torch.long


# ---- the networks ---------------------------------------------------------------------------


def _poses(sizes: list[int], seed: int = 0, dtype: torch.dtype = torch.float32) -> list[Data]:
    gen = torch.Generator().manual_seed(seed)
    return [
        Data(
            pos=3 * torch.randn(n, 3, generator=gen, dtype=dtype),
            z=torch.randint(1, 10, (n,), generator=gen),
            lig=torch.ones(n, dtype=torch.bool),
        )
        for n in sizes
    ]


def test_the_radius_graph_links_atoms_of_one_graph_within_the_cutoff() -> None:
    batch = Batch.from_data_list(_poses([5, 1, 9, 7]))
    edge_index, length = RadiusGraph(4.0)(batch.pos, batch.batch)
    distance = torch.cdist(batch.pos, batch.pos)
    same = batch.batch[:, None] == batch.batch[None, :]
    want = (distance <= 4.0) & same & ~torch.eye(len(batch.pos), dtype=torch.bool)
    got = torch.zeros_like(want)
    got[edge_index[1], edge_index[0]] = True
    assert torch.equal(got, want) and len(length) == int(want.sum())
    assert torch.allclose(length, distance[edge_index[0], edge_index[1]])


@pytest.mark.parametrize("strategy", ["store", "recompute", "stream"])
def test_schnet_gradients_match_the_full_graph_in_float64(strategy: str) -> None:
    torch.manual_seed(0)
    net = SchNetNetwork(hidden=8, interactions=2, cutoff=4.0, gaussians=6, offset=0.5).double()
    torch.nn.init.normal_(net.schnet.lin2.weight)  # not the zero start: every path in play
    poses = _poses([6, 6, 6, 4, 4], dtype=torch.float64)
    combination = combframe.create_combination("max", pred_scale=2.0)

    def loss(combined: torch.Tensor, per_pose: torch.Tensor) -> torch.Tensor:
        return (combined - 1.0).pow(2).sum()

    chunk = 1 if strategy == "store" else 2  # store's chunks need vmap, not a PyG Batch
    want = full_graph_gradients(net, combination, poses, loss, sizes=[3, 2], chunk_size=chunk)
    got = multipose_gradients(
        net, combination, poses, loss, strategy, sizes=[3, 2], chunk_size=chunk
    )
    for a, b in zip(want, got, strict=False):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for a, b in zip(want[2], got[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


class Tiny(torch.nn.Module):
    """A user's network, named by import path in the tests."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))
        self.bias = torch.nn.Parameter(torch.tensor(float(bias)))

    def forward(self, pose: Any) -> torch.Tensor:
        batch = getattr(pose, "batch", None)
        batch = torch.zeros(len(pose.z), dtype=torch.long) if batch is None else batch
        size = int(batch.max()) + 1
        spread = torch.zeros(size).index_add(0, batch, pose.pos.norm(dim=-1))
        return self.bias + self.scale * spread / 1000


def test_a_network_by_import_path_gets_the_extra_keys(tmp_path: Path, cache: str) -> None:
    info = DataInfo("molecules", 0, 1.0)
    config = load_config(None, ["model.name=tests.test_app_readers:Tiny", "model.scale=2.5"])
    net = build_network(config, info)
    assert isinstance(net, Tiny) and float(net.scale.detach()) == 2.5
    path = _cmet(tmp_path)
    overrides = [f"data={path}", "reader.target=r_exp_dg", *FAST, cache]
    overrides += ["model.name=tests.test_app_readers:Tiny", "model.bias=-9", "lr=1e-4"]
    assert train(load_config(None, overrides), progress=False, write=False).metrics


@pytest.mark.parametrize(
    ("overrides", "kind", "says"),
    [
        (["model.name=mlp"], "molecules", "use model.name=schnet"),
        (["model.name=schnet"], "vectors", "use model.name=mlp"),
        (["model.name=gcn"], "molecules", "unknown network 'gcn'"),
        (["model.name=schnet", "model.width=3"], "molecules", "not settings of the built-in"),
        (["model.name=tests.test_app_readers:Nope"], "molecules", "no torch.nn.Module class"),
        (["model.name=no_such_pkg.mod:Net"], "molecules", "cannot import 'no_such_pkg.mod'"),
        (["model.name=tests.test_app_readers:Tiny", "model.size=3"], "molecules", "size"),
    ],
)
def test_a_network_that_cannot_be_built_says_why(
    overrides: list[str], kind: str, says: str
) -> None:
    with pytest.raises(ConfigError, match="model") as info:
        build_network(load_config(None, overrides), DataInfo(kind, 3, 0.0))
    assert says in str(info.value)


def test_each_file_format_trains_from_the_command_line(
    tmp_path: Path, cache: str, capsys: pytest.CaptureFixture[str]
) -> None:
    smi, values = _smiles(tmp_path)
    rows = [
        f"1ia1,1.5,{PDB}/1ia1/1ia1_ligand.sdf,{PDB}/1ia1/1ia1_protein_one_lig_removed.pdb",
        f"1uou,2.5,{PDB}/1uou/1uou_ligand.sdf,{PDB}/1uou/1uou_protein_one_lig_removed.pdb",
        f"1s3v,0.5,{PDB}/1s3v/1s3v_ligand.sdf,{PDB}/1s3v/1s3v_protein_one_lig_removed.pdb",
    ]
    inputs = [
        [f"data={_cmet(tmp_path)}", "reader.target=r_exp_dg"],
        [f"data={_manifest(tmp_path, rows)}", "reader.pocket_cutoff=4"],
        [f"data={smi}", f"reader.values={values}", "reader.conformers=2"],
    ]
    for i, data in enumerate(inputs):
        runs = tmp_path / f"runs{i}"
        assert main(["train", *data, *FAST, cache, f"output_dir={runs}"]) == 0
        (run,) = runs.iterdir()
        assert json.loads((run / "metrics.json").read_text())["data"]["kind"] == "molecules"
    assert capsys.readouterr().out.count("held-out") == 3


def test_an_empty_sdf_a_bad_protein_and_an_unknown_name_are_one_line_errors(
    tmp_path: Path, cache: str
) -> None:
    empty = tmp_path / "empty.sdf"
    empty.write_text("")
    assert "RDKit cannot read it as an SDF file" in _error([f"data={empty}", "reader.target=x"])
    (tmp_path / "bad.pdb").write_text("HETATM garbage\n")
    rows = [f"{c},1,{PDB}/{c}/{c}_ligand.sdf,bad.pdb" for c in ("1ia1", "1uou")]
    message = _error([f"data={_manifest(tmp_path, rows)}", cache])
    assert "row 2 (compound '1ia1'): protein" in message and "bad.pdb" in message
    message = _error(["data=chembI", cache])
    assert "neither a file nor a built-in set (chembl, cmet, posebusters)" in message


def _cmet_run(tmp_path: Path, cache: str, *overrides: str) -> Path:
    """Train SchNet on a few c-Met ligands into ``tmp_path/runs/one``; return that folder."""
    runs = tmp_path / "runs"
    args = ["train", "data=cmet", *FAST, cache, "strategy=stream", *overrides]
    assert main([*args, f"output_dir={runs}", "name=one"]) == 0
    return runs / "one"


def test_a_trained_schnet_is_rebuilt_and_predicts_the_molecules_it_was_tested_on(
    tmp_path: Path, cache: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv

    from combframe.app.predict import load

    runs = _cmet_run(tmp_path, cache, "reader.limit=6", "dtype=float64").parent
    model = load(runs / "one")
    assert isinstance(model.model, SchNetNetwork)
    out = tmp_path / "p.csv"
    assert (
        main(["predict", str(runs / "one"), "data=cmet", "reader.limit=6", cache, "-o", str(out)])
        == 0
    )
    with out.open() as handle:
        assert len(list(csv.DictReader(handle))) == 6
    metrics = json.loads((runs / "one" / "metrics.json").read_text())
    assert metrics["data"]["kind"] == "molecules"


def test_predict_reads_molecules_without_values(tmp_path: Path, cache: str) -> None:
    from combframe.app.config import TrainConfig

    path = _cmet(tmp_path, count=1)
    config = TrainConfig.model_validate({"data": str(path), "reader": {"cache_dir": str(tmp_path)}})
    data = load_data(config, for_prediction=True)
    assert len(data.train) == 1 and data.test == () and torch.isnan(data.train[0].target)


# ---- conflicting entries, interrupts, hints ---------------------------------------------


def _sdf_of(tmp_path: Path, records: list[tuple[str, str, float]]) -> Path:
    """An SDF of one embedded record per ``(smiles, title, dG)``."""
    path = tmp_path / "docked.sdf"
    with Chem.SDWriter(str(path)) as writer:
        for smiles, name, value in records:
            mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
            AllChem.EmbedMolecule(mol, randomSeed=1)
            mol.SetProp("_Name", name)
            mol.SetProp("dG", str(value))
            writer.write(mol)
    return path


def _two_molecules(tmp_path: Path, title: str = "L1") -> Path:
    """Ethanol (dG -5) and benzene (dG -8) under one title, then L2 and L3."""
    records = [("CCO", title, -5), ("c1ccccc1", title, -8), ("CCO", "L2", -5), ("CCCO", "L3", -6)]
    return _sdf_of(tmp_path, records)


def test_different_molecules_under_one_sdf_title_are_a_bad_compound(
    tmp_path: Path, cache: str
) -> None:
    path = _two_molecules(tmp_path)
    overrides = [f"data={path}", "reader.target=dG", cache]
    message = _error(overrides)
    assert str(path) in message and "record 1 (compound 'L1')" in message
    assert "is C6 but record 0 of the same name is C2 O1" in message
    data = _data([*overrides, "reader.skip_invalid=true"])
    assert len(data.skipped) == 1 and {c.name for c in (*data.train, *data.test)} == {"L2", "L3"}


def test_one_molecule_with_two_values_under_one_title_is_a_bad_compound(
    tmp_path: Path, cache: str
) -> None:
    records = [("CCO", "L1", -5), ("OCC", "L1", -5), ("CCO", "L1", -6), ("CCCO", "L2", -6)]
    message = _error([f"data={_sdf_of(tmp_path, records)}", "reader.target=dG", cache])
    assert "record 2 (compound 'L1'): has the value -6 but record 0" in message


def test_a_values_csv_with_two_values_for_one_name_is_refused(tmp_path: Path, cache: str) -> None:
    smi, values = _smiles(tmp_path)
    first = values.read_text().splitlines()[1].split(",")[0]
    overrides = [f"data={smi}", f"reader.values={values}", "reader.conformers=1", cache]
    with values.open("a") as handle:
        handle.write(f"{first},5\n")  # the same value again: accepted
    assert len(_data(overrides).train) + len(_data(overrides).test) == 3
    with values.open("a") as handle:
        handle.write(f"{first},-9\n")
    message = _error(overrides)
    assert f"{str(values)!r}: rows 2 and 6 (compound {first!r}): two values, 5 and -9" in message
    data = _data([*overrides, "reader.skip_invalid=true"])
    assert len(data.skipped) == 1 and len((*data.train, *data.test)) == 2


def test_a_manifest_with_two_values_for_one_compound_is_refused(tmp_path: Path, cache: str) -> None:
    rows = [
        f"a,1,{PDB}/1ia1/1ia1_ligand.sdf",
        f"b,2,{PDB}/1ia1/1ia1_ligands.sdf",
        f"c,3,{PDB}/1ia1/1ia1_ligand.sdf",
        f"a,1.5,{PDB}/1ia1/1ia1_ligands.sdf",
    ]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("compound,value,poses\n" + "\n".join(rows) + "\n")
    message = _error([f"data={manifest}", cache])
    assert f"{str(manifest)!r}: rows 2 and 5 (compound 'a'): two values, 1 and 1.5" in message
    data = _data([f"data={manifest}", "reader.skip_invalid=true", cache])
    assert len(data.skipped) == 1 and {c.name for c in (*data.train, *data.test)} == {"b", "c"}


def test_a_smiles_csv_with_one_name_on_two_molecules_is_refused(tmp_path: Path, cache: str) -> None:
    path = tmp_path / "series.csv"
    path.write_text("name,smiles,value\neth,CCO,1\nprop,CCCO,2\neth,CCCCO,3\nbut,CCCCCO,4\n")
    overrides = [f"data={path}", "reader.conformers=1", cache]
    message = _error(overrides)
    assert "records 0 and 2 (compound 'eth'): two rows of one name" in message
    data = _data([*overrides, "reader.skip_invalid=true"])
    assert len(data.skipped) == 1 and {c.name for c in (*data.train, *data.test)} == {
        "prop",
        "but",
    }


def test_a_cache_entry_copied_over_another_is_rebuilt(tmp_path: Path) -> None:
    one, two = _cmet(tmp_path, count=2, name="one.sdf"), _cmet(tmp_path, count=4, name="two.sdf")
    _read(one, tmp_path)
    (entry_one,) = (tmp_path / "cache").iterdir()
    _read(two, tmp_path)
    (entry_two,) = set((tmp_path / "cache").iterdir()) - {entry_one}
    entry_two.write_bytes(entry_one.read_bytes())
    assert len(_read(two, tmp_path).compounds) == 4
    assert json.loads(torch.load(entry_two, weights_only=True)["meta"])["key"] == entry_two.stem


def _interrupt_embedding(signum: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every embedding fail as if ``signum`` arrived during it."""
    import combframe.app.chem as chem

    def embed(*args: Any) -> list[Any]:
        os.kill(os.getpid(), signum)
        raise chem.ChemError("RDKit could not embed it in 3D (ETKDG found no conformer)")

    monkeypatch.setattr(chem, "conformer_ensemble", embed)


@pytest.mark.parametrize("skip", [False, True])
def test_sigterm_while_reading_blames_nothing_caches_nothing_and_exits_143(
    tmp_path: Path, cache: str, monkeypatch: pytest.MonkeyPatch, capsys: Any, skip: bool
) -> None:
    import signal

    smi, values = _smiles(tmp_path)
    _interrupt_embedding(15, monkeypatch)
    args = ["train", f"data={smi}", f"reader.values={values}", cache, *FAST]
    # Ignored unless the reader records it: a regression fails here, not kills pytest.
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert main([*args, f"reader.skip_invalid={str(skip).lower()}"]) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err.strip()
    assert err == "combframe train: stopped by SIGTERM while reading the data; nothing was cached"
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_ctrl_c_that_rdkit_catches_while_embedding_is_raised_again(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import threading

    smi = tmp_path / "big.smi"
    smi.write_text("CC(C)C[C@H](NC(=O)[C@@H](Cc1ccccc1)NC(=O)c1cnccn1)B(O)O big\nCCO small\n")
    opts = ReaderConfig(conformers=300, skip_invalid=True, cache_dir=tmp_path / "cache")
    timer = threading.Timer(0.3, os.kill, (os.getpid(), 2))
    timer.start()
    try:
        with pytest.raises(readers.ReadInterruptedError) as info:
            readers.read_molecules(str(smi), opts, torch.float32, values=False)
    finally:
        timer.cancel()
    assert info.value.signum == 2 and "SIGINT" in str(info.value)
    assert not (tmp_path / "cache").exists()
    assert "Interrupted" not in capfd.readouterr().err  # RDKit's own warning is not shown


def test_reader_keys_and_values_get_close_names(tmp_path: Path, cache: str) -> None:
    with pytest.raises(ConfigError, match=r"reader\.targt: .*did you mean 'target'"):
        load_config(None, ["reader.targt=dG"])
    path = _two_molecules(tmp_path, title="L0")
    message = _error([f"data={path}", "reader.target=dg", "reader.group_by=dG", cache])
    assert "(no SD property dg; did you mean 'dG'?)" in message
    smi, values = _smiles(tmp_path)
    name = smi.read_text().splitlines()[0].split()[1]
    values.write_text(values.read_text().replace(f"{name},", f"X{name.lower()},"))
    message = _error([f"data={smi}", f"reader.values={values}", "reader.conformers=1", cache])
    assert f"has no value (a finite number) for this compound in {str(values)!r}" in message
    assert f"did you mean 'X{name.lower()}'" in message
    blocks = path.read_text().split("$$$$\n")
    path.write_text("$$$$\n".join("\n" + b.split("\n", 1)[1] if b else b for b in blocks))
    message = _error([f"data={path}", "reader.target=dG", cache])
    assert "reader.group_by=<property>" in message and "dG" in message


def test_posebusters_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib

    real = resources.files

    def files(package: str) -> Any:
        if package == "posebusters":
            raise ModuleNotFoundError("No module named 'posebusters'")
        return real(package)

    monkeypatch.setattr(readers.resources, "files", files)
    with pytest.raises(readers.DataError, match=r"pip install 'combframe\[chem\]'"):
        readers._inputs("posebusters", ReaderConfig())
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert any(
        r.startswith("posebusters") for r in pyproject["project"]["optional-dependencies"]["chem"]
    )


def test_predict_notes_skipped_records_and_writes_targets_as_read(
    tmp_path: Path, cache: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv

    run = _cmet_run(tmp_path, cache, "reader.limit=4", "reader.skip_invalid=true")
    path = _cmet(tmp_path, count=3)
    blocks = path.read_text().split("$$$$\n")
    blocks[1] = blocks[1].replace("M  END", "M  END\n9999 garbage", 1).replace("V2000", "V9999")
    path.write_text("$$$$\n".join(blocks))
    capsys.readouterr()
    out = tmp_path / "p.csv"
    predict = ["predict", str(run), f"data={path}", "reader.target=r_exp_dg", "-o"]
    assert main([*predict, str(out)]) == 0
    assert "note: reader.skip_invalid left out 1 record(s)" in capsys.readouterr().err
    supplier = Chem.SDMolSupplier(str(RDKIT_DATA / "cmet_ligands.sdf"))
    read = [m.GetProp("r_exp_dg") for m, _ in zip(supplier, range(3), strict=False)]
    with out.open() as handle:
        assert [r["target"] for r in csv.DictReader(handle)] == [read[0], read[2]]

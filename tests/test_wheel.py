"""The wheel works outside the checkout: built from the sources, installed (not editable) into a fresh
virtual environment, its console scripts compose, train, test and evaluate from a folder elsewhere, with
the configs from the installed package and the data from ``./data`` (:func:`default_data_root`)."""
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pyg_equireann.cli import CONF_DIR
from pyg_equireann.datamodules.base import DATA_ENV, data_root_hint, default_data_root
from pyg_equireann.utils import source_checkout

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("equireann-train", "equireann-eval", "equireann-bench", "equireann-export", "equireann-nonlocal")
TINY = ["model.num_channels=8", "data.batch_size=10",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "num_threads=1"]


def run(*args, cwd, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in (DATA_ENV, "HYDRA_FULL_ERROR", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def head_frames(src: Path, dst: Path, n: int) -> None:
    """The first ``n`` frames of the (ext)xyz file ``src`` into ``dst``, as they are."""
    lines, out = src.read_text().splitlines(keepends=True), []
    while lines and n > 0:
        size = int(lines[0]) + 2
        out += lines[:size]
        lines, n = lines[size:], n - 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(out))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (an in-place build writes build/ and *.egg-info into
    the checkout); no network, setuptools from this environment."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for name in ("pyg_equireann", "datamodules", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", tmp / "dist", src, cwd=tmp)
    (path,) = (tmp / "dist").glob("pyg_equireann-*.whl")
    return path


def test_wheel_contents(wheel):
    """One top-level package with every module of the checkout (``datamodules/`` inside it) and every
    config; no tests, no data, no top-level ``datamodules``."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
        top_level = z.read(f"{dist_info}/top_level.txt").decode().split()
    assert {n.split("/")[0] for n in names} == {"pyg_equireann", dist_info}
    assert top_level == ["pyg_equireann"]
    modules = {f"pyg_equireann/{p.relative_to(REPO / 'pyg_equireann').as_posix()}"
               for p in (REPO / "pyg_equireann").rglob("*.py")}
    modules |= {f"pyg_equireann/datamodules/{p.name}" for p in (REPO / "datamodules").glob("*.py")}
    configs = {f"pyg_equireann/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert len(configs) > 30 and "pyg_equireann/conf/data/xyz.yaml" in configs
    assert modules | configs | {"pyg_equireann/conf/__init__.py"} == {n for n in names if not n.startswith(dist_info)}
    assert all(f"{script} = pyg_equireann.cli." in entry_points for script in SCRIPTS)


def test_installed_wheel_trains_and_evaluates_outside_the_checkout(wheel, tmp_path):
    """``pip install --no-deps <wheel>`` into a new virtual environment whose dependencies are this
    environment's site-packages (a .pth file naming them: path entries, so the editable install's finder
    there stays inactive); from a folder outside the checkout: ``--cfg job``, a 1-epoch training with its
    final test on ``./data/acac`` (a few frames of the shipped files), then ``equireann-eval``."""
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    py = venv / "bin" / "python"
    purelib = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip())
    shared = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (purelib / "zz_shared_deps.pth").write_text("".join(f"{p}\n" for p in shared))
    run(py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel, cwd=tmp_path)

    work = tmp_path / "elsewhere"
    acac = REPO / "data" / "acac"
    head_frames(acac / "train_300K.xyz", work / "data" / "acac" / "train_300K.xyz", 20)
    for name in ("test_MD_300K.xyz", "test_MD_600K.xyz", "test_dihedral.xyz"):
        head_frames(acac / name, work / "data" / "acac" / name, 4)
    shutil.copy(acac / "isolated_atoms.xyz", work / "data" / "acac")

    probe = run(py, "-c", """if True:
        import importlib.resources, importlib.util, json
        import pyg_equireann, pyg_equireann.datamodules as dm
        from pyg_equireann.datamodules.base import default_data_root
        from pyg_equireann.utils import source_checkout
        try:
            import datamodules  # noqa: F401
            bare = True
        except ModuleNotFoundError:
            bare = False
        conf = importlib.resources.files("pyg_equireann.conf")
        print(json.dumps({"package": pyg_equireann.__file__, "datamodules": dm.__file__, "bare": bare,
                          "conf": str(conf), "checkout": source_checkout() and str(source_checkout()),
                          "data": str(default_data_root())}))""", cwd=work).stdout
    found = json.loads(probe.splitlines()[-1])
    assert Path(found["package"]) == purelib / "pyg_equireann" / "__init__.py"
    assert Path(found["datamodules"]) == purelib / "pyg_equireann" / "datamodules" / "__init__.py"
    assert Path(found["conf"]) == purelib / "pyg_equireann" / "conf"
    yamls = lambda root: sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*.yaml"))  # noqa: E731
    assert yamls(found["conf"]) == yamls(REPO / "conf")
    assert found["bare"] is False and found["checkout"] is None
    assert Path(found["data"]) == work / "data"

    bin_ = venv / "bin"
    assert (bin_ / "equireann-train").read_text().splitlines()[0] == f"#!{py}"
    job = OmegaConf.create(run(bin_ / "equireann-train", "data=acac", "--cfg", "job", "--resolve", cwd=work).stdout)
    assert Path(job.data.root) == work / "data" and job.data._target_ == "pyg_equireann.datamodules.acac_datamodule"

    run_dir = work / "run"
    run(bin_ / "equireann-train", "data=acac", *TINY, "test=true", f"hydra.run.dir={run_dir}", cwd=work)
    resolved = OmegaConf.load(run_dir / "config_resolved.yaml")
    assert Path(resolved.data.root) == work / "data"
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["git"] is None and info["packages"]["pyg_equireann"]
    tested = json.loads((run_dir / "test_metrics.json").read_text())
    assert all(math.isfinite(tested[f"test/{name}/forces_mae"]) for name in ("MD_300K", "MD_600K"))

    best = run_dir / "checkpoints" / "best.ckpt"
    run(bin_ / "equireann-eval", f"ckpt_path={best}", "data=acac", "num_threads=1", cwd=work)
    (eval_dir,) = (run_dir / "eval").glob("acac_*")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["MD_300K/forces_mae"] == pytest.approx(tested["test/MD_300K/forces_mae"], rel=1e-4)


def test_default_data_root(monkeypatch, tmp_path):
    """``$PYG_EQUIREANN_DATA``, else the checkout's data/ (the installed case is the test above); the
    configs' ``${data_root:}`` and the ``${project_root:}/data`` of run folders recorded before it agree;
    a missing file there names the folder and the variable."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert source_checkout() == REPO and default_data_root() == REPO / "data" == Path(CONF_DIR).parent / "data"
    old = OmegaConf.create({"new": "${data_root:}", "old": f"${{oc.env:{DATA_ENV},${{project_root:}}/data}}"})
    assert OmegaConf.to_container(old, resolve=True) == {"new": str(REPO / "data"), "old": str(REPO / "data")}
    hint = data_root_hint(REPO / "data" / "acac" / "missing.xyz")
    assert hint == f" (data folder {REPO / 'data'}: the source checkout's data/; set {DATA_ENV}=<folder> for another)"
    assert data_root_hint(tmp_path / "missing.xyz") == ""

    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert default_data_root() == tmp_path
    assert OmegaConf.to_container(old, resolve=True) == {"new": str(tmp_path), "old": str(tmp_path)}
    assert data_root_hint(tmp_path / "x.xyz").endswith(f"{tmp_path}: ${DATA_ENV}; set {DATA_ENV}=<folder> for another)")

"""The wheel carries what a run needs (configs, recipes, C sources, the shipped corpus) and its
console commands work from an empty directory, outside the checkout."""
import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("qat-train", "qat-export", "qat-eval", "qat-generate", "qat-footprint", "qat-report")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q",
                           "-w", str(out)],
                          capture_output=True, text=True, cwd=out)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("qat-*.whl")
    return path


def test_the_wheel_holds_configs_recipes_c_sources_and_commands(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for pattern in
               ("qat/conf/**/*.yaml", "qat/csrc/*.c", "qat/csrc/*.h", "qat/**/*.py")
               for p in ROOT.glob(pattern)}
    assert "qat/conf/train.yaml" in shipped and "qat/conf/recipe/w4g64_kd.yaml" in shipped
    assert "qat/csrc/gemv.c" in shipped
    assert not shipped - names, f"missing from the wheel: {sorted(shipped - names)[:10]}"
    assert "qat/models/tiny_corpus.txt" in names
    assert not any(n.startswith(("conf/", "recipes/", "tests/", "bench/")) for n in names)
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for command in COMMANDS:
        assert f"{command} = " in text, command


def _venv_with_wheel(tmp_path: Path, wheel: Path) -> Path:
    """A new virtualenv holding the wheel; its dependencies come from this interpreter's
    site-packages through a .pth path (appended after the venv's own, so the installed qat wins,
    and the checkout's editable-install hook is not run)."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                           "--no-deps", str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return env_dir


@pytest.mark.slow
def test_qat_train_runs_from_an_empty_directory_with_the_installed_package(wheel, tmp_path):
    env_dir = _venv_with_wheel(tmp_path, wheel)
    work, cache = tmp_path / "empty", tmp_path / "cache"
    work.mkdir()
    env = {**os.environ, "QAT_CACHE": str(cache), "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("PYTHONPATH", None)
    where = subprocess.run([str(env_dir / "bin" / "python"), "-c",
                            "import qat, qat.native as n; print(qat.__file__); print(n.available())"],
                           capture_output=True, text=True, cwd=work, env=env)
    assert where.returncode == 0, where.stderr[-2000:]
    location, native = where.stdout.split()
    assert Path(location).is_relative_to(env_dir) and native == "True"
    for command in COMMANDS:
        helped = subprocess.run([str(env_dir / "bin" / command), "--help"], capture_output=True,
                                text=True, cwd=work, env=env)
        text = helped.stdout + helped.stderr
        assert helped.returncode == 0 and ("usage: " + command in text or "qat-train" in text), \
            (command, text[-1000:])
    out = subprocess.run([str(env_dir / "bin" / "qat-train"), "model=tiny", "data=tiny",
                          "trainer.max_steps=2", "logger=none", "eval.fp_ppl=false",
                          "trainer.enable_progress_bar=false"],
                         capture_output=True, text=True, cwd=work, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    (metrics,) = (work / "outputs").glob("*/*/metrics.json")
    assert json.loads(metrics.read_text())["steps"] == 2
    assert list((cache / "kernels").glob("qat-native-*.so")), "native kernels were not compiled"
    assert not (work / "conf").exists() and not list(work.glob("*.yaml"))

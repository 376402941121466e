"""The foundation commands: help with examples, manifest + validate on real BraTS."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medseg.cli import main
from medseg.data.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_main_help_shows_examples(capsys):
    text = _help(capsys, ["--help"])
    assert "examples:" in text
    assert "medseg manifest --layout brats2018 DATA_DIR -o cases.csv" in text
    assert "medseg validate cases.csv" in text
    for command in ("demo", "manifest", "validate"):
        assert command in text


@pytest.mark.parametrize("command, example", [
    ("manifest", "medseg manifest --layout brats2018 ../shared/data/brats18 -o data_manifests/brats18.csv"),
    ("validate", "medseg validate data_manifests/brats18.csv"),
    ("demo", "medseg demo "),  # the demo's options belong to the training/inference work; only examples are checked
])
def test_command_help_shows_examples(capsys, command, example):
    text = _help(capsys, [command, "--help"])
    assert "examples:" in text and example in text
    if command == "manifest":
        for layout in ("brats2018", "brats2021", "brats2023", "msd", "nnunet", "auto"):
            assert f"  {layout}" in text


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "examples:" in capsys.readouterr().out


def test_python_dash_m_help():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "medseg", "--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout and "medseg validate cases.csv" in result.stdout


def test_manifest_and_validate_real_brats(shared_data, tmp_path, capsys, monkeypatch):
    """As in the README: run from a folder next to the data, with the relative path to it."""
    monkeypatch.chdir(tmp_path)
    data = Path(os.path.relpath(shared_data / "brats18", tmp_path))
    assert main(["manifest", "--layout", "brats2018", str(data), "-o", "m.csv"]) == 0
    out = capsys.readouterr().out
    assert "10 cases" in out and "10 with labels" in out
    m = read_manifest("m.csv")
    assert len(m) == 10 and m.channels == ("flair", "t1", "t1ce", "t2") and m.label_scheme == "brats"
    assert all(c.label is not None and c.label.path.name == f"{c.id}_seg.nii.gz" for c in m)
    assert all(ref.path.name == f"{c.id}_{ch}.nii.gz" for c in m for ch, ref in c.images.items())
    assert main(["validate", "m.csv"]) == 0
    captured = capsys.readouterr()
    assert "m.csv: valid" in captured.out and "error:" not in captured.err


def test_manifest_auto_with_folds(shared_data, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["manifest", str(shared_data / "brats18"), "-o", str(out), "--folds", "5"]) == 0
    m = read_manifest(out)
    assert len(m) == 10 and sorted(c.fold for c in m) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]

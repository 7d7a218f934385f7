"""Clear errors, not tracebacks: bad data files, bad size limits, duplicate YAML keys, entries
replaced by symlinks, directories given as files and huge echoed values.

How each test was checked to fail without its mechanism (on the main branch before this change):
a 20000x20000 PNG ended in ``DecompressionBombError`` (exit 4, no file name); an ``.npz`` object
array in a raw ``ValueError`` (exit 4); an ``.npz`` with 0 samples was accepted; ``--max-size nan``
was a traceback; a duplicate ``name:`` kept the last one; an entry symlinked to a copy outside
the store passed ``cache verify``; ``data.tensors: /etc`` said "does not exist"; a long recipe
name was echoed in full.
"""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from accelc.build import build, prepare
from accelc.cache import SizeLimitError, Store
from accelc.cli import main
from accelc.errors import DataError, RecipeError


def _bomb_png(path: Path, side: int = 20000) -> None:
    """A PNG header claiming ``side`` x ``side`` RGB pixels (a few hundred bytes on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _build_with_validation(project, cache, tmp_path, spec):
    recipe = project.write_recipe(
        tmp_path, "tiny_bad_data",
        data={"calibration": {"tensors": str(project.root / "cal.npz")}, "validation": spec},
    )
    return build(recipe, out_dir=tmp_path / "out", cache_dir=cache)


def test_decompression_bomb_image_is_bad_input_naming_the_file(reliability_project, reliability_warm_cache, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _bomb_png(images / "bomb.png")
    spec = {"images": str(images), "preprocess": {"resize": 32, "crop": 32}}
    err = _build_with_validation(reliability_project, reliability_warm_cache, tmp_path, spec).result.failure
    assert isinstance(err, DataError) and err.exit_code == 2, err
    assert "bomb.png" in str(err) and "too large" in str(err)


def test_npz_with_an_object_array_is_bad_input_naming_the_file(reliability_project, reliability_warm_cache, tmp_path):
    np.savez(tmp_path / "objects.npz", input=np.array([{"a": 1}, None], dtype=object))
    err = _build_with_validation(
        reliability_project, reliability_warm_cache, tmp_path, {"tensors": str(tmp_path / "objects.npz")}
    ).result.failure
    assert isinstance(err, DataError) and err.exit_code == 2, err
    assert "objects.npz" in str(err) and "'input'" in str(err)


def test_npz_with_zero_samples_is_bad_input_naming_the_file(reliability_project, reliability_warm_cache, tmp_path):
    np.savez(tmp_path / "empty.npz", input=np.zeros((0, 3, 32, 32), np.float32))
    err = _build_with_validation(
        reliability_project, reliability_warm_cache, tmp_path, {"tensors": str(tmp_path / "empty.npz")}
    ).result.failure
    assert isinstance(err, DataError) and err.exit_code == 2, err
    assert "empty.npz" in str(err) and "0 samples" in str(err)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "lots"])
def test_cache_gc_refuses_a_size_that_is_not_a_finite_number(tmp_path, value):
    r = CliRunner().invoke(main, ["cache", "gc", "--cache-dir", str(tmp_path / "c"), "--max-size", value])
    assert r.exit_code == 2 and "finite number" in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    env = {"ACCELC_CACHE_MAX_MIB": value}
    r = CliRunner().invoke(main, ["cache", "gc", "--cache-dir", str(tmp_path / "c")], env=env)
    assert r.exit_code == 2 and "finite number" in r.output, r.output


def test_a_build_refuses_a_size_limit_of_nan(reliability_golden, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELC_CACHE_MAX_MIB", "nan")
    with pytest.raises(SizeLimitError, match="ACCELC_CACHE_MAX_MIB") as e:
        build(reliability_golden.int8.recipe, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert e.value.exit_code == 2


def test_duplicate_recipe_keys_are_refused_naming_the_key_and_line(reliability_golden, tmp_path):
    text = reliability_golden.int8.recipe.read_text()
    bad = tmp_path / "dup.yaml"
    bad.write_text(text + "name: other\n")
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("name:"))
    with pytest.raises(RecipeError, match=f"duplicate key 'name' \\(first at line {first}\\)") as e:
        prepare(bad)
    assert f"line {len(text.splitlines()) + 1}" in str(e.value)


def test_an_entry_replaced_by_a_symlink_is_not_trusted(reliability_golden, reliability_warm_cache, tmp_path):
    store = Store(reliability_warm_cache)
    key = reliability_golden.int8.keys["quantize"]
    outside = tmp_path / "outside_copy"
    shutil.move(str(store.entries / key), outside)
    (store.entries / key).symlink_to(outside, target_is_directory=True)
    assert store.lookup(key) is None
    r = CliRunner().invoke(main, ["cache", "verify", "--cache-dir", str(reliability_warm_cache)])
    assert r.exit_code == 6 and "symlink" in r.output, r.output
    outcome = build(reliability_golden.int8.recipe, out_dir=tmp_path / "out", cache_dir=reliability_warm_cache)
    assert outcome.ok
    assert [s["node"] for s in outcome.report["stages"] if not s["cached"]] == ["quantize"]
    assert not (store.entries / key).is_symlink() and (store.entries / key).is_dir()
    assert (outside / "meta.json").is_file()  # what the link pointed at is left alone


def test_a_directory_given_as_a_data_file_is_called_a_directory(reliability_project, tmp_path):
    recipe = reliability_project.write_recipe(
        tmp_path, "tiny_dir", data={"calibration": {"tensors": "/etc"}, "validation": {"tensors": "/etc"}}
    )
    with pytest.raises(DataError, match="/etc is a directory, not a file"):
        build(recipe, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")


def test_a_huge_recipe_value_is_cut_in_the_error(reliability_project, tmp_path):
    recipe = tmp_path / "long_name.yaml"
    recipe.write_text(yaml.safe_dump(reliability_project.recipe_dict("x" * 200_000), sort_keys=False))
    with pytest.raises(RecipeError) as e:
        prepare(recipe)
    assert "200002 characters" in str(e.value)  # the repr of the name, with its quotes
    assert len(str(e.value)) < 2000

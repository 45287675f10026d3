"""A precompute split over processes (`--num_parts=N --part=I`): each part writes its own folder of the one
cache, the reader takes them together as the cache a single process would have written, and writers that
would encode the same examples twice (another split, or a whole run, at the same time) are refused."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from genmask_jax.data.pipeline import context_shape
from genmask_jax.encoders import cache as cache_module
from genmask_jax.encoders import fingerprint
from genmask_jax.encoders.cache import (
    CacheLocked,
    CacheMismatch,
    CacheWriter,
    EmbeddingCache,
    part_folder,
)
from genmask_jax.encoders.precompute import precompute
from tests.test_precompute_integrity import REPO, RUN, assert_complete, small_config


def _ids_by_folder(folder):
    return {
        os.path.relpath(f, folder): sorted(i for _, ids in cache_module.completed_shards(f) for i in ids)
        for f in cache_module.cache_folders(folder)
    }


def test_parts_read_together_as_the_cache_of_one_process(tmp_path):
    c = small_config()
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    precompute(c, whole, **RUN)
    results = [precompute(c, split, **RUN, part=(i, 3)) for i in range(3)]
    assert [r["written"] for r in results] == [8, 8, 8]  # indices i, i + 3, ... of 12 seg and 12 gen

    # Each part holds examples i, i + 3, i + 6, i + 9 of each task, and nothing is at the top.
    folders = _ids_by_folder(split)
    assert sorted(folders) == [f"part-0000{i}-of-00003" for i in range(3)]
    for i in range(3):
        want = [f"shapes-0-train-{k}{suffix}" for k in range(i, 12, 3) for suffix in ("", "-caption")]
        assert folders[f"part-0000{i}-of-00003"] == sorted(want)

    one, parts = EmbeddingCache(whole, fingerprint(c.encoder)), EmbeddingCache(split, fingerprint(c.encoder))
    assert sorted(one.index) == sorted(parts.index) and parts.meta == one.meta
    for example_id in one.index:
        header_one, states_one = one.record(example_id)
        header_parts, states_parts = parts.record(example_id)
        assert header_parts == header_one
        np.testing.assert_array_equal(states_parts, states_one)
    assert_complete(split, c)
    c.encoder.cache_dir = split
    assert context_shape(c) == (c.encoder.context_length, c.encoder.dim)  # the meta of a cache of parts

    # A part run again resumes (nothing to do), and so does a whole run over the parts' work.
    again = precompute(c, split, **RUN, part=(1, 3))
    assert (again["written"], again["already"]) == (0, 8)
    after = precompute(c, split, **RUN)
    assert (after["written"], after["already"]) == (0, 24)


def test_a_whole_run_encodes_only_what_the_parts_left(tmp_path):
    c, folder = small_config(), str(tmp_path / "cache")
    for i in (0, 2):  # part 1 never ran (a failed host)
        precompute(c, folder, **RUN, part=(i, 3))
    rest = precompute(c, folder, **RUN)
    assert (rest["written"], rest["already"]) == (8, 16)
    assert sorted(_ids_by_folder(folder)["."]) == sorted(
        f"shapes-0-train-{k}{suffix}" for k in range(1, 12, 3) for suffix in ("", "-caption")
    )
    assert_complete(folder, c)

    # Nor does a split of another size encode again what is there.
    other = precompute(c, folder, **RUN, part=(0, 2))
    assert (other["written"], other["already"]) == (0, 12)


def _writer(folder, part=None):
    return CacheWriter(folder, 8, 12, "float32", {"name": "toy"}, shard_size=4, part=part)


def test_writers_that_would_encode_the_same_examples_are_refused(tmp_path):
    folder = str(tmp_path / "cache")
    with _writer(folder, (0, 2)):
        with _writer(folder, (1, 2)) as sibling:  # the other part of the same split: at once
            assert sibling.folder == part_folder(folder, 1, 2)
        for other in [None, (0, 3), (2, 3)]:
            with pytest.raises(CacheLocked) as error:
                _writer(folder, other)
            message = str(error.value)
            assert "part-00000-of-00002/writer.lock exists" in message and "--num_parts" in message
        # the refused writers left no lock behind
        assert not os.path.exists(os.path.join(folder, "writer.lock"))
        assert not os.path.exists(os.path.join(part_folder(folder, 0, 3), "writer.lock"))
    with _writer(folder + "/"):  # one after the other is fine (the same folder, however written)
        with pytest.raises(CacheLocked, match="is writing the whole cache"):
            _writer(folder + "/", (1, 2))
    with _writer(folder, (0, 3)):
        pass


def test_a_lock_left_by_a_killed_part_does_not_block_another_split(tmp_path):
    folder = str(tmp_path / "cache")
    with _writer(folder, (0, 2)):
        pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True)
    host, _, *rest = cache_module._lock_line().split(" ")
    with open(os.path.join(part_folder(folder, 0, 2), "writer.lock"), "w") as f:
        f.write(" ".join([host, dead.stdout.strip(), *rest]) + "\n")
    with _writer(folder, (0, 3)):
        pass


def test_parts_written_with_other_settings_are_refused(tmp_path):
    folder = str(tmp_path / "cache")
    with _writer(folder, (0, 2)) as writer:
        writer.add("a", np.ones((3, 8), np.float32), text="a")
    with pytest.raises(CacheMismatch, match=r"part-00000-of-00002 was written with other settings \(dtype"):
        CacheWriter(folder, 8, 12, "bfloat16", {"name": "toy"}, part=(1, 2))

    # Parts that started at once with other settings: the reader names them.
    with _writer(folder, (1, 2)) as writer:
        writer.add("b", np.ones((3, 8), np.float32), text="b")
    meta_path = os.path.join(part_folder(folder, 1, 2), "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["encoder"]["name"] = "other"
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(CacheMismatch) as error:
        EmbeddingCache(folder)
    message = str(error.value)
    assert "part-00001-of-00002 was written with other settings than part-00000-of-00002" in message
    assert "encoder.name: part-00000-of-00002 'toy', part-00001-of-00002 'other'" in message


def test_an_id_in_two_parts_and_a_damaged_part_shard_are_named(tmp_path):
    folder = str(tmp_path / "cache")
    with _writer(folder, (0, 2)) as first, _writer(folder, (1, 2)) as second:  # sources that repeat an id
        first.add("same", np.ones((3, 8), np.float32), text="same")
        second.add("same", np.ones((3, 8), np.float32), text="same")
    with pytest.raises(CacheMismatch, match="holds 'same' twice"):
        EmbeddingCache(folder)

    folder = str(tmp_path / "damaged")
    with _writer(folder, (1, 2)) as writer:
        writer.add("a", np.ones((3, 8), np.float32), text="a")
    shard = os.path.join(part_folder(folder, 1, 2), "shard-00000.array_record")
    with open(shard, "r+b") as f:
        f.truncate(10)
    with pytest.raises(CacheMismatch) as error:
        EmbeddingCache(folder)
    assert f"--out={folder} --part=1 --num_parts=2" in str(error.value)


_CLI = [sys.executable, "-m", "genmask_jax.encoders.precompute", "--config=configs/genmask.py",
        "--config.data.shapes.train_size=6", "--config.data.gen_sources=", "--splits=train", "--batch_size=2",
        "--shard_size=2"]


def test_the_command_runs_the_parts_at_once(tmp_path):
    out = str(tmp_path / "cache")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    runs = [
        subprocess.Popen(_CLI + [f"--out={out}", "--num_parts=2", f"--part={i}"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-2000:]
        assert "'written': 3" in stdout
    assert sorted(EmbeddingCache(out).index) == sorted(f"shapes-0-train-{k}" for k in range(6))

    bad = subprocess.run(_CLI + [f"--out={out}", "--num_parts=2", "--part=2"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--part must be one of 0 ... --num_parts - 1" in bad.stderr
    assert "Traceback" not in bad.stderr

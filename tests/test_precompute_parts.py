"""A precompute split over processes (`--num_parts=N --part=I`): each part writes its own folder of the one
cache, the reader takes them together as the cache a single process would have written, and writers that
would encode the same examples twice (another split, or a whole run, at the same time) are refused."""

import json
import os
import shutil
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
from genmask_jax.encoders.precompute import PrecomputeError, precompute
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


def test_a_rerun_spot_checks_the_records_of_every_folder(tmp_path, monkeypatch):
    """A resume compared only its own folder's records with the data: a whole run, or a split of another
    size, over parts of data that changed since counted every record as done."""
    from genmask_jax.data import shapes

    c, folder = small_config(), str(tmp_path / "cache")
    for i in range(2):
        precompute(c, folder, **RUN, part=(i, 2))
    real = shapes.SyntheticShapes.__getitem__
    changed = lambda self, i: {**real(self, i), "text": "new"}  # noqa: E731
    monkeypatch.setattr(shapes.SyntheticShapes, "__getitem__", changed)
    for part in [None, (0, 3)]:
        with pytest.raises(PrecomputeError, match="part-0000[01]-of-00002: .* the data now gives 'new'"):
            precompute(c, folder, **RUN, part=part)


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


def test_an_id_in_two_parts_is_read_from_the_first_and_damage_names_the_part(tmp_path):
    """Sets that share an example (a training split that is also an evaluation split, concatenated with
    another source) can put it in two parts that run at once: both encode it. The reader refused the
    whole cache; it now reads the first part's record, as a whole run keeps the first one it wrote."""
    folder = str(tmp_path / "cache")
    with _writer(folder, (0, 2)) as first, _writer(folder, (1, 2)) as second:
        first.add("same", np.full((3, 8), 1.0, np.float32), text="same")
        second.add("same", np.full((3, 8), 2.0, np.float32), text="same")
        second.add("b", np.full((2, 8), 3.0, np.float32), text="b")
    cache = EmbeddingCache(folder)
    assert sorted(cache.index) == ["b", "same"]
    assert cache.lookup("same", "same")[0][:3].tolist() == [[1.0] * 8] * 3
    assert cache.lookup("b", "b")[0][:2].tolist() == [[3.0] * 8] * 2

    # One writer never writes an id twice: within a folder it is damage.
    part = part_folder(folder, 1, 2)
    for end in (".array_record", ".ids.json"):
        shutil.copy(os.path.join(part, "shard-00000" + end), os.path.join(part, "shard-00001" + end))
    with pytest.raises(CacheMismatch, match="holds 'b' twice"):
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


def test_a_part_resumes_beside_a_damaged_part_and_in_a_folder_named_with_brackets(tmp_path):
    """A resume spot-checked the whole cache, so another part's damage stopped it; and `[1]` in a folder's
    name was a glob pattern: the cache read as empty and a resume overwrote its first shard."""
    c, folder = small_config(), str(tmp_path / "runs[1]" / "cache")
    for i in range(2):
        precompute(c, folder, **RUN, part=(i, 2))
    shard = os.path.join(part_folder(folder, 1, 2), "shard-00000.array_record")
    os.truncate(shard, os.path.getsize(shard) // 2)
    again = precompute(c, folder, **RUN, part=(0, 2))
    assert (again["written"], again["already"]) == (0, 12)
    repaired = precompute(c, folder, **RUN, part=(1, 2))
    assert (repaired["written"], repaired["already"]) == (4, 8)  # the damaged shard's examples
    assert_complete(folder, c)


def test_every_part_is_compared_with_the_config(tmp_path):
    """A field one side does not know is not compared (a digest a host could not compute): a part written
    from other weights hid behind a first part without the digest."""
    folder = str(tmp_path / "cache")
    for part, digest in [((0, 2), None), ((1, 2), "A")]:
        with CacheWriter(folder, 8, 12, "float32", {"name": "qwen", "model_digest": digest}, part=part):
            pass
    EmbeddingCache(folder, {"name": "qwen", "model_digest": "A"})
    with pytest.raises(CacheMismatch, match="model_digest: cache 'A', config 'B'"):
        EmbeddingCache(folder, {"name": "qwen", "model_digest": "B"})
    with pytest.raises(CacheMismatch, match="model_digest: cache .*'A', config 'B'"):
        CacheWriter(folder, 8, 12, "float32", {"name": "qwen", "model_digest": "B"}, part=(0, 3))


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

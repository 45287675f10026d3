"""A cache that no longer holds what it says: shards damaged after they were published, examples whose
read failed during the precompute, contexts of other images. Each is named by the reader instead of
surfacing as a raw error (or as a cache miss hours into training), and a rerun of the precompute repairs
what it can. What is not evidence of damage (a file this user may not read, an I/O error, a corrupt image,
pixels of another JPEG decoder) deletes nothing and fails no run that can go on."""

import errno
import logging
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import UnidentifiedImageError

from genmask_jax.data import shapes
from genmask_jax.data.pipeline import default_data_config
from genmask_jax.data.skips import BadExample, io_errno, is_data_error, skip_reason, transient
from genmask_jax.data.sources import make_task_source
from genmask_jax.encoders import cache as cache_module
from genmask_jax.encoders import encoder_input, fingerprint, make_encoder
from genmask_jax.encoders import precompute as precompute_module
from genmask_jax.encoders.cache import (
    CacheMismatch,
    CacheUnreadable,
    CacheWriter,
    EmbeddingCache,
    encode_record,
)
from genmask_jax.encoders.precompute import PrecomputeError, precompute

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = dict(splits=["train"], batch_size=4, shard_size=4, dtype="float32")  # seg 12 + gen 12: six shards


def small_config():
    c = default_data_config()
    c.resolution, c.num_threads = (16, 16), 1
    c.shapes.train_size = 12
    c.encoder.context_length, c.encoder.dim = 12, 8
    return c


def assert_complete(folder, c):
    """Every training example of `c` reads from the cache as the encoder encodes it."""
    cache, encoder = EmbeddingCache(folder, fingerprint(c.encoder)), make_encoder(c.encoder)
    assert len(cache) == 24
    for task in ("seg", "gen"):
        source = make_task_source("shapes", "train", c, task)
        for i in range(len(source)):
            raw = source[i]
            context, mask = cache.lookup(raw["id"], raw["text"])
            want_context, want_mask = encoder.encode(None, [raw["text"]])
            np.testing.assert_array_equal(context, want_context[0])
            np.testing.assert_array_equal(mask, want_mask[0])


# Damaged shards.


def _truncate(shard):
    os.truncate(shard, os.path.getsize(shard) // 2)


def _empty_ids(shard):
    open(shard.replace(".array_record", ".ids.json"), "w").close()


def _garbled_ids(shard):
    with open(shard.replace(".array_record", ".ids.json"), "w") as f:
        f.write('["shapes-0-train-4", "shap')


def _binary_ids(shard):
    with open(shard.replace(".array_record", ".ids.json"), "wb") as f:
        f.write(b'["shapes-0-train-4", "\xff\xfe\x80')


DAMAGE = {
    "truncated shard": (_truncate, "it does not open"),
    "empty ids.json": (_empty_ids, "its ids.json is not a JSON list of ids"),
    "cut ids.json": (_garbled_ids, "its ids.json is not a JSON list of ids"),
    "ids.json not UTF-8": (_binary_ids, "its ids.json is not a JSON list of ids"),
    "deleted shard, ids.json kept": (os.remove, "its file is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_shard_is_named_by_the_reader_and_rewritten_by_a_rerun(tmp_path, damage, caplog):
    """A truncated array_record surfaced as RuntimeError("Corrupted Riegeli ..."), an empty ids.json as a
    JSONDecodeError; a rerun trusted every ids.json and called the cache complete."""
    c, folder = small_config(), str(tmp_path / "cache")
    precompute(c, folder, **RUN)
    damage_fn, reason = DAMAGE[damage]
    shard = os.path.join(folder, "shard-00001.array_record")
    damage_fn(shard)

    with pytest.raises(CacheMismatch) as error:
        EmbeddingCache(folder, fingerprint(c.encoder))
    message = str(error.value)
    assert "\n" not in message and "shard-00001.array_record is damaged" in message and reason in message
    assert f"python -m genmask_jax.encoders.precompute --config=... --out={folder}" in message

    with caplog.at_level(logging.WARNING, logger="genmask_jax.encoders.cache"):
        again = precompute(c, folder, **RUN)
    assert (again["written"], again["already"]) == (4, 20)  # the damaged shard's examples only
    assert "shard-00001.array_record is damaged" in caplog.text and "shard-00001.ids.json" in caplog.text
    assert_complete(folder, c)


def _raise_reading(monkeypatch, path_end, error):
    """Makes opening the cache file whose path ends with `path_end` raise `error`: a shard through
    array_record (`_num_records`), an ids.json through `open`."""
    if path_end.endswith(".array_record"):
        real = cache_module._num_records
        count = lambda path: _raise(error) if path.endswith(path_end) else real(path)
        monkeypatch.setattr(cache_module, "_num_records", count)
    else:
        monkeypatch.setattr(
            cache_module, "open",
            lambda path, *a, **k: _raise(error) if path.endswith(path_end) else open(path, *a, **k),
            raising=False,
        )


def _raise(error):
    raise error


# What array_record 0.8.6 raises, seen with real files: a shard this user may not read (root without
# CAP_DAC_OVERRIDE, mode 000) and an I/O error (riegeli names the failed call and its strerror).
UNREADABLE = {
    "shard: permission denied": (
        "shard-00001.array_record",
        RuntimeError("open() failed: Permission denied; opening /cache/shard-00001.array_record"),
    ),
    "shard: riegeli I/O error": (
        "shard-00001.array_record",
        RuntimeError("pread() failed: Input/output error; reading /cache/shard-00001.array_record; at 0"),
    ),
    "shard: OSError EIO": ("shard-00001.array_record", OSError(errno.EIO, "Input/output error")),
    "ids.json: permission denied": (
        "shard-00001.ids.json", PermissionError(errno.EACCES, "Permission denied", "shard-00001.ids.json")
    ),
    "ids.json: OSError ESTALE": ("shard-00001.ids.json", OSError(errno.ESTALE, "Stale file handle")),
}


@pytest.mark.parametrize("fault", UNREADABLE)
def test_a_shard_that_does_not_read_for_the_file_system_is_named_not_deleted(tmp_path, monkeypatch, fault):
    """Any error opening a shard or reading its ids.json counted as damage: a resume deleted the shard and
    its ids.json (a passing NFS error, a file of another user) and encoded its examples again, GPU hours
    with a 7B encoder."""
    c, folder = small_config(), str(tmp_path / "cache")
    precompute(c, folder, **RUN)
    before = sorted(os.listdir(folder))
    path_end, error = UNREADABLE[fault]
    _raise_reading(monkeypatch, path_end, error)

    with pytest.raises(CacheUnreadable) as raised:
        precompute(c, folder, **RUN)
    message = str(raised.value)
    assert "\n" not in message and f"{path_end} does not read" in message and "nothing deleted" in message
    assert sorted(os.listdir(folder)) == before
    if path_end.endswith(".ids.json"):  # the readers open shards with array_record's data source
        with pytest.raises(CacheUnreadable, match=f"{path_end} does not read"):
            EmbeddingCache(folder, fingerprint(c.encoder))

    monkeypatch.undo()  # readable again: nothing to redo
    again = precompute(c, folder, **RUN)
    assert (again["written"], again["already"]) == (0, 24)
    assert_complete(folder, c)


def _cache_whose_records_raise(folder: str, message: str) -> EmbeddingCache:
    """A cache of 4 examples in shards of 2 whose every record read raises RuntimeError(`message`), as
    array_record reports a failed system call."""
    with CacheWriter(folder, dim=2, context_length=4, dtype="float32", shard_size=2) as writer:
        for i in range(4):
            writer.add(f"id{i}", np.full((1, 2), i, np.float32))
    cache = EmbeddingCache(folder)

    class FailingSource:
        def __getitem__(self, position):
            raise RuntimeError(message)

    cache._source = FailingSource()
    return cache


def test_a_record_that_the_file_system_does_not_read_is_not_called_damage(tmp_path):
    """A lookup whose read fails in a system call (an I/O error) said the shard was damaged and to delete
    it."""
    folder = str(tmp_path)
    message = f"pread() failed: Input/output error; reading {folder}/shard-00001"
    cache = _cache_whose_records_raise(folder, message)
    with pytest.raises(CacheUnreadable, match=r"shard-00001.array_record does not read \(RuntimeError: pread"
                                              r".*not damage \(nothing deleted\)"):
        cache.lookup("id3")


def test_io_errno_tells_a_failed_system_call_from_corrupt_data(tmp_path):
    """Seen with array_record's real reader: a missing file (a failed open) and a shard cut short."""
    with CacheWriter(str(tmp_path), dim=2, context_length=4, dtype="float32") as writer:
        writer.add("a", np.ones((1, 2), np.float32))
    shard = str(tmp_path / "shard-00000.array_record")
    _truncate(shard)
    for path, want in ((str(tmp_path / "gone.array_record"), errno.ENOENT), (shard, None)):
        with pytest.raises(RuntimeError) as raised:
            cache_module._num_records(path)
        assert io_errno(raised.value) == want
    assert io_errno(OSError(errno.ESTALE, "Stale file handle")) == errno.ESTALE
    assert io_errno(RuntimeError("Corrupted Riegeli chunk: failed: bad hash")) is None
    assert io_errno(ValueError("open() failed: Input/output error")) is None


def test_a_record_that_does_not_read_names_its_shard(tmp_path):
    """A record overwritten inside a shard that still opens (its count is right): the reader's lookup
    names the shard, and says to delete it, since a resumed writer does not read records."""
    folder = str(tmp_path)
    with CacheWriter(folder, dim=4, context_length=4, dtype="float32", shard_size=3) as writer:
        for i in range(9):
            writer.add(f"id{i}", np.full((2, 4), i, np.float32))
    shard = os.path.join(folder, "shard-00001.array_record")
    data = bytearray(open(shard, "rb").read())
    at = data.index(b'"id3"')
    data[at + 1 : at + 4] = b"xx9"
    open(shard, "wb").write(bytes(data))
    cache = EmbeddingCache(folder)
    assert cache.record("id8")[1][0, 0] == 8
    with pytest.raises(CacheMismatch, match=r"shard-00001.array_record is damaged \(the record of 'id3' "
                                            r"does not read: .*delete it and shard-00001.ids.json"):
        cache.lookup("id3")


def test_a_shard_gone_since_the_cache_opened_is_damage_not_a_file_system_problem(tmp_path):
    """array_record reports a missing file as a failed open() (ENOENT), which names a file-system problem
    for a file that is there; for one that is gone, the shard is damaged and a rerun writes it again."""
    shard = os.path.join(str(tmp_path), "shard-00001.array_record")
    message = f"open() failed: No such file or directory; opening {shard}"
    cache = _cache_whose_records_raise(str(tmp_path), message)
    with pytest.raises(CacheUnreadable, match="shard-00001.array_record does not read"):
        cache.record("id3")  # the file is there: not called damage
    os.remove(shard)
    with pytest.raises(CacheMismatch, match=r"shard-00001.array_record is damaged") as error:
        cache.record("id3")
    assert not isinstance(error.value, CacheUnreadable)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names synced files from /proc")
def test_a_resume_leaves_readable_shards_alone_and_syncs_what_it_publishes(tmp_path, monkeypatch):
    """Every published shard and ids.json reaches the disk (fsync) before the ids.json that publishes it
    replaces its temporary file."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                  real_fsync(fd)))
    folder = str(tmp_path / "cache")
    with CacheWriter(folder, dim=2, context_length=4, dtype="float32", shard_size=2) as writer:
        for i in range(3):
            writer.add(f"id{i}", np.full((1, 2), i, np.float32))
    names = [os.path.basename(path) for path in synced]
    for shard in ("shard-00000", "shard-00001"):
        assert names.index(f"{shard}.array_record") < names.index(next(
            n for n in names if n.startswith(f"{shard}.ids.json.tmp-")))
    assert "cache" in names  # the folder, after each rename
    before = {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder)}
    with CacheWriter(folder, dim=2, context_length=4, dtype="float32", shard_size=2) as writer:
        assert writer.done == {"id0", "id1", "id2"}
    assert {name: os.path.getmtime(os.path.join(folder, name)) for name in os.listdir(folder)} == before


# Examples whose read fails during the precompute.


def _failing_read(monkeypatch, index, times, error=None):
    """Makes reading seg example `index` of the synthetic shapes raise `error` (OSError EIO) `times` times;
    returns the list of failures so far."""
    real, failures = shapes.SyntheticShapes.__getitem__, []

    def read(self, i):
        if i == index and self.task == "seg" and len(failures) < times:
            failures.append(i)
            raise error if error is not None else OSError(errno.EIO, "Input/output error")
        return real(self, i)

    monkeypatch.setattr(shapes.SyntheticShapes, "__getitem__", read)
    return failures


# Errors that may pass when the read is tried again.
TRANSIENT = {
    "EIO": OSError(errno.EIO, "Input/output error"),
    "ESTALE": OSError(errno.ESTALE, "Stale file handle"),
    "riegeli EIO": RuntimeError("pread() failed: Input/output error; reading /data/train.array_record"),
    "timeout": TimeoutError("read timed out"),
    "connection reset": ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "memory": MemoryError(),
}
# Errors that fail the same way on every try: the example is a bad one.
PERMANENT = {
    "corrupt JPEG": UnidentifiedImageError("cannot identify image file <_io.BytesIO object at 0x7f>"),
    "missing image": FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/images/5.jpg"),
    "permission denied": PermissionError(errno.EACCES, "Permission denied", "/data/images/5.jpg"),
    "not an image": ValueError("image has 2 channels"),
    "riegeli, missing file": RuntimeError("open() failed: No such file or directory; opening /data/x"),
}


@pytest.mark.parametrize("error", TRANSIENT)
def test_a_read_that_fails_once_is_tried_again(tmp_path, monkeypatch, error):
    """It was logged as a skip and left out of the cache: training stopped on a cache miss when it met the
    example, hours in."""
    c, folder = small_config(), str(tmp_path / "cache")
    failures = _failing_read(monkeypatch, 5, times=1, error=TRANSIENT[error])
    result = precompute(c, folder, **RUN, retry_wait_s=0)
    assert failures == [5] and result["written"] == 24 and "no examples skipped" in result["skips"]
    monkeypatch.undo()
    assert_complete(folder, c)


@pytest.mark.parametrize("error", PERMANENT)
def test_a_read_that_fails_for_good_is_a_skip_without_retries(tmp_path, monkeypatch, error):
    """Every error but BadExample was retried and then failed the command: a corrupt JPEG (PIL's
    UnidentifiedImageError, an OSError) failed every precompute, after sleeping 2 + 4 s for it, though the
    pipelines skip the example (their read fails before any lookup)."""
    c, folder = small_config(), str(tmp_path / "cache")
    failures = _failing_read(monkeypatch, 5, times=100, error=PERMANENT[error])
    sleeps = []
    monkeypatch.setattr(precompute_module, "time", types.SimpleNamespace(sleep=sleeps.append))
    result = precompute(c, folder, **RUN)
    kind = type(PERMANENT[error]).__name__
    assert failures == [5] and sleeps == []  # read once
    assert result["written"] == 23 and result["skips"] == f"precompute: 1 examples skipped ({kind}: 1)"
    again = precompute(c, folder, **RUN)  # a resume reads it once more, and skips it again
    assert failures == [5, 5] and (again["written"], again["already"]) == (0, 23)


def test_which_errors_are_transient():
    assert all(transient(e) for e in TRANSIENT.values())
    assert not any(transient(e) for e in PERMANENT.values())
    assert not transient(BadExample("bad_polygon", "no points"))
    assert transient(InterruptedError()) and transient(OSError(errno.EAGAIN, "Try again"))



def test_the_evaluation_job_reads_the_same_rule_from_skip_reasons():
    """The evaluation job decides from a skip reason ("kind: detail") whether to record an example as
    unreadable for good; it must agree with `transient` on the errors themselves."""
    for error in [*TRANSIENT.values(), *PERMANENT.values(), BadExample("bad_polygon", "no points")]:
        assert is_data_error(skip_reason(error)) == (not transient(error)), error
    assert is_data_error(None) and is_data_error("UnidentifiedImageError: cannot identify image file")


def test_the_retry_log_names_the_example_without_reading_it_again(tmp_path, monkeypatch, caplog):
    """The log line before a retry asked the source for the id again: RefCOCO reads the record for it,
    which raised the same I/O error outside the retry, and the example went unread."""
    c, folder = small_config(), str(tmp_path / "cache")
    real_read, real_id = shapes.SyntheticShapes.__getitem__, shapes.SyntheticShapes.example_id
    storage = {"down": False}  # from the first read of example 5 until the wait before its retry

    def read(self, i):
        if i == 5 and self.task == "seg" and not storage.setdefault("failed", False):
            storage.update(down=True, failed=True)
        if storage["down"]:
            raise OSError(errno.EIO, "Input/output error")
        return real_read(self, i)

    def example_id(self, i):
        if storage["down"]:
            raise OSError(errno.EIO, "Input/output error")
        return real_id(self, i)

    monkeypatch.setattr(shapes.SyntheticShapes, "__getitem__", read)
    monkeypatch.setattr(shapes.SyntheticShapes, "example_id", example_id)
    wait = types.SimpleNamespace(sleep=lambda seconds: storage.update(down=False))
    monkeypatch.setattr(precompute_module, "time", wait)
    with caplog.at_level(logging.INFO, logger="genmask_jax.encoders.precompute"):
        result = precompute(c, folder, **RUN)
    assert storage["failed"] and result["written"] == 24
    retry = "reading shapes-0-train-5 failed (OSError: [Errno 5] Input/output error): trying again"
    assert retry in caplog.text


def test_a_read_that_keeps_failing_fails_the_precompute_after_the_rest_is_written(tmp_path, monkeypatch):
    c, folder = small_config(), str(tmp_path / "cache")
    failures = _failing_read(monkeypatch, 5, times=100)
    with pytest.raises(PrecomputeError) as error:
        precompute(c, folder, **RUN, read_tries=2, retry_wait_s=0)
    message = str(error.value)
    assert failures == [5, 5] and "\n" not in message
    assert "1 examples did not read after 2 tries" in message and "shapes-0-train-5" in message
    assert "OSError" in message and "rerun the same command" in message
    cache = EmbeddingCache(folder, fingerprint(c.encoder))
    assert len(cache) == 23 and cache.missing(["shapes-0-train-5"]) == ["shapes-0-train-5"]

    monkeypatch.undo()  # the file system is back
    again = precompute(c, folder, **RUN)
    assert (again["written"], again["already"]) == (1, 23)
    assert_complete(folder, c)


def test_a_bad_example_is_still_a_skip_not_a_failure(tmp_path, monkeypatch):
    real, calls = shapes.SyntheticShapes.__getitem__, []

    def read(self, i):
        if i == 5 and self.task == "seg":
            calls.append(i)
            raise BadExample("bad_polygon", "no points")
        return real(self, i)

    monkeypatch.setattr(shapes.SyntheticShapes, "__getitem__", read)
    result = precompute(small_config(), str(tmp_path), **RUN, retry_wait_s=0)
    assert calls == [5] and result["written"] == 23  # not tried again: bad data stays bad
    assert result["skips"] == "precompute: 1 examples skipped (bad_polygon: 1)"


@pytest.mark.parametrize("error", ["permission denied", "EIO"])
def test_a_source_whose_reads_all_fail_stops_the_precompute(tmp_path, monkeypatch, error):
    """An image folder this user may not read skipped every example and the command exited 0 with an
    empty cache (an EIO: 3 tries each, 6 s apart, through the whole split); training then stopped on the
    first cache miss. As many failures in a row as stop a pipeline stop the command, naming the job."""
    c, folder = small_config(), str(tmp_path / "cache")
    c.max_consecutive_skips = 3
    fault = {**PERMANENT, **TRANSIENT}[error]
    real, reads = shapes.SyntheticShapes.__getitem__, []

    def read(self, i):
        if self.task == "seg" and i >= 4:  # the folder became unreadable after 4 examples
            reads.append(i)
            raise fault
        return real(self, i)

    monkeypatch.setattr(shapes.SyntheticShapes, "__getitem__", read)
    monkeypatch.setattr(precompute_module, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    with pytest.raises(PrecomputeError) as stopped:
        precompute(c, folder, **RUN, read_tries=2)
    message = str(stopped.value)
    assert "seg/train: 3 examples in a row did not read" in message and "\n" not in message
    assert type(fault).__name__ in message and "rerun the same command" in message
    assert sorted(set(reads)) == [4, 5, 6]  # stopped there, not at the end of the split
    assert len(EmbeddingCache(folder, fingerprint(c.encoder))) == 4  # what was read is kept

    monkeypatch.undo()  # the folder reads again: the rerun goes on
    again = precompute(c, folder, **RUN)
    assert (again["written"], again["already"]) == (20, 4)
    assert_complete(folder, c)


def test_a_max_consecutive_skips_below_one_is_refused_as_training_refuses_it(tmp_path):
    """`failed_in_a_row == 0` never held: a source failing throughout was skipped to its end, and the
    training the cache was made for refuses the setting."""
    from genmask_jax.data.sources import DataConfigError

    c = small_config()
    c.max_consecutive_skips = 0
    with pytest.raises(DataConfigError, match="data.max_consecutive_skips must be >= 1"):
        precompute(c, str(tmp_path / "cache"), **RUN)
    assert not (tmp_path / "cache").exists()


def test_failures_apart_from_each_other_are_skips(tmp_path, monkeypatch):
    c = small_config()
    c.max_consecutive_skips = 2
    real = shapes.SyntheticShapes.__getitem__

    def read(self, i):
        if self.task == "seg" and i % 2:
            raise BadExample("bad_polygon", "no points")
        return real(self, i)

    monkeypatch.setattr(shapes.SyntheticShapes, "__getitem__", read)
    result = precompute(c, str(tmp_path / "cache"), **RUN)
    assert result["written"] == 18 and result["skips"] == "precompute: 6 examples skipped (bad_polygon: 6)"
    # A rerun reads only the bad ones again (they have no record): the cached ones between them are reads
    # that succeeded, so the bad ones are still not in a row.
    again = precompute(c, str(tmp_path / "cache"), **RUN)
    assert (again["written"], again["already"]) == (0, 18) and again["skips"] == result["skips"]


_CLI = """
import sys
from genmask_jax.data import shapes
from genmask_jax.encoders import precompute as module
from genmask_jax.infer import cli

real, error = shapes.SyntheticShapes.__getitem__, sys.argv.pop(1)
def read(self, i):
    if i == 5 and self.task == "seg":
        raise eval(error)
    return real(self, i)
shapes.SyntheticShapes.__getitem__ = read
module.time.sleep = lambda seconds: None
config = module._define_flags()
cli.run(lambda: module.main(config.value), prog="genmask_jax.encoders.precompute")
"""


def _run_cli(out, error: str):
    return subprocess.run(
        [sys.executable, "-c", _CLI, error, "--config=configs/genmask.py",
         "--config.data.shapes.train_size=6", "--config.data.gen_sources=", f"--out={out}", "--splits=train",
         "--batch_size=2"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}, capture_output=True,
        text=True, timeout=300,
    )


def test_the_command_exits_non_zero_naming_the_unread_examples(tmp_path):
    out = tmp_path / "cache"
    done = _run_cli(out, 'OSError(5, "Input/output error")')
    assert done.returncode == 1, done.stderr[-2000:]
    assert "1 examples did not read after 3 tries" in done.stderr and "shapes-0-train-5" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(EmbeddingCache(str(out))) == 5

    corrupt = _run_cli(out, '__import__("PIL").UnidentifiedImageError("cannot identify image file")')
    assert corrupt.returncode == 0, corrupt.stderr[-2000:]  # skipped, as the pipelines skip it
    assert "'skips': 'precompute: 1 examples skipped (UnidentifiedImageError: 1)'" in corrupt.stdout


# Contexts of other images.


def test_a_lookup_with_another_image_shape_is_refused(tmp_path):
    """Only the id and the text were compared: a cache written at one resolution served contexts of the
    old images at another."""
    folder = str(tmp_path)
    small = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    with CacheWriter(folder, dim=2, context_length=4, dtype="float32") as writer:
        writer.add("a", np.ones((1, 2), np.float32), text="the red circle", image=small)
        writer.add_skip("b", "ValueError: aspect ratio", text="the star", image=small)
        writer.add("text only", np.ones((1, 2), np.float32), text="a caption")
    cache = EmbeddingCache(folder)
    assert cache.lookup("a", "the red circle", small)[1].sum() == 1
    big = np.zeros((24, 24, 3), np.uint8)
    shape_changed = r"'a' was encoded from a 16x16x3 uint8 image, the data now gives 24x24x3 uint8"
    with pytest.raises(CacheMismatch, match=shape_changed + ".*write a new cache"):
        cache.lookup("a", "the red circle", big)
    with pytest.raises(CacheMismatch, match="'b' was encoded from a 16x16x3"):
        cache.lookup("b", "the star", big)
    assert cache.lookup("a", "the red circle")[1].sum() == 1  # no image given: unchecked
    assert cache.lookup("text only", "a caption", big)[1].sum() == 1  # no image read: nothing to compare


def test_a_lookup_with_other_pixels_warns_once_and_serves_the_context(tmp_path, monkeypatch, caplog):
    """Other pixels of the same shape were refused: the same JPEG files decoded by another Pillow or
    libjpeg build (a cache precomputed on a GPU machine, read on a TPU host) would stop every lookup."""
    monkeypatch.setattr(cache_module, "PIXEL_WARNING_EVERY", 3)
    folder = str(tmp_path)
    image = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    with CacheWriter(folder, dim=2, context_length=4, dtype="float32") as writer:
        for name in "abcd":
            writer.add(name, np.full((1, 2), ord(name), np.float32), text=name, image=image)
    cache = EmbeddingCache(folder)
    decoded_elsewhere = image ^ 1  # each pixel off by one
    with caplog.at_level(logging.WARNING, logger="genmask_jax.encoders.cache"):
        context, mask = cache.lookup("b", "b", decoded_elsewhere)
        assert context[0, 0] == ord("b") and mask.sum() == 1
        cache.lookup("c", "c", decoded_elsewhere)
        cache.lookup("a", "a", image)  # the same pixels: nothing to say
        assert [r.getMessage() for r in caplog.records if "other pixels" in r.getMessage()] == [
            f"embedding cache {folder}: 1 looked-up images (the first: 'b') have other pixels than the "
            "images of the same shapes that their contexts were encoded from: replaced images, or another "
            "JPEG decoder on this machine than on the one that ran the precompute; contexts may be stale: "
            "if the images changed, write a new cache (`python -m genmask_jax.encoders.precompute "
            "--config=... --out=NEW_FOLDER`, or delete this folder first): a rerun into this folder keeps "
            "its records [logged at the first, then every 3]"
        ]
        cache.lookup("d", "d", decoded_elsewhere)
    assert cache.pixel_mismatches == 3
    assert "3 looked-up images (the first: 'b')" in caplog.records[-1].getMessage()
    with pytest.raises(CacheMismatch, match="16x16x3 uint8 image, the data now gives 16x16x4 uint8"):
        cache.lookup("a", "a", np.zeros((16, 16, 4), np.uint8))  # the shape is still checked


def test_records_written_before_image_digests_are_still_read(tmp_path):
    folder = str(tmp_path)
    with CacheWriter(folder, dim=2, context_length=4, dtype="float32") as writer:
        writer.add("new", np.ones((1, 2), np.float32), text="t")
    writer = CacheWriter(folder, dim=2, context_length=4, dtype="float32")
    writer._write("old", encode_record("old", np.ones((2, 2), np.float32), "float32", "t"))  # no digest
    writer.close()
    cache = EmbeddingCache(folder)
    assert "image" not in cache.record("old")[0]
    assert cache.lookup("old", "t", np.zeros((8, 8, 3), np.uint8))[1].sum() == 2


def test_a_cache_precomputed_at_one_resolution_is_refused_at_another(tmp_path, monkeypatch):
    """The precompute records the image the encoder reads (the toy encoder reads none: made to here)."""
    from genmask_jax.encoders import precompute as module

    with_image = lambda raw, task, config: (raw["image"] if task == "seg" else None, raw["text"], False)
    monkeypatch.setattr(module, "encoder_input", with_image)
    c, folder = small_config(), str(tmp_path)
    precompute(c, folder, **RUN)
    cache = EmbeddingCache(folder, fingerprint(c.encoder))
    at_16 = make_task_source("shapes", "train", c, "seg")[0]
    c.resolution = (24, 24)
    at_24 = make_task_source("shapes", "train", c, "seg")[0]
    assert (at_24["id"], at_24["text"]) == (at_16["id"], at_16["text"])
    assert cache.lookup(at_16["id"], at_16["text"], at_16["image"])[1].any()
    with pytest.raises(CacheMismatch, match="16x16x3 uint8 image, the data now gives 24x24x3 uint8"):
        cache.lookup(at_24["id"], at_24["text"], at_24["image"])
    assert encoder_input(at_24, "seg", c.encoder)[0] is None  # what the pipelines pass for the toy encoder


def test_the_training_pipeline_checks_the_image_it_looks_up(tmp_path, monkeypatch):
    """The pipelines pass the image the encoder reads to `lookup`: a cache written at 16x16 stops a
    training run at 24x24 instead of serving the old images' contexts."""
    import genmask_jax.encoders as encoders
    from genmask_jax.data.pipeline import make_train_iterator
    from genmask_jax.encoders import precompute as module

    with_image = lambda raw, task, config: (raw["image"] if task == "seg" else None, raw["text"], False)
    monkeypatch.setattr(module, "encoder_input", with_image)
    monkeypatch.setattr(encoders, "encoder_input", with_image)
    c, folder = small_config(), str(tmp_path)
    precompute(c, folder, **RUN)
    c.encoder.cache_dir = folder
    batch = next(make_train_iterator(c, 2, 2, seed=0, process_index=0, process_count=1))
    assert all(batch[task]["context_mask"].any(axis=-1).all() for task in ("seg", "gen"))
    c.resolution = (24, 24)
    with pytest.raises(CacheMismatch, match="16x16x3 uint8 image, the data now gives 24x24x3 uint8"):
        next(make_train_iterator(c, 2, 2, seed=0, process_index=0, process_count=1))


def test_the_training_pipeline_goes_on_over_other_pixels_with_a_warning(tmp_path, monkeypatch, caplog):
    """The same images decoded by another JPEG decoder (pixels off by one here) stopped training."""
    import genmask_jax.encoders as encoders
    from genmask_jax.data.pipeline import make_train_iterator
    from genmask_jax.encoders import precompute as module

    with_image = lambda raw, task, config: (raw["image"] if task == "seg" else None, raw["text"], False)
    monkeypatch.setattr(module, "encoder_input", with_image)
    c, folder = small_config(), str(tmp_path)
    precompute(c, folder, **RUN)
    decoded_elsewhere = lambda raw, task, config: (
        raw["image"] ^ 1 if task == "seg" else None, raw["text"], False
    )
    monkeypatch.setattr(encoders, "encoder_input", decoded_elsewhere)
    c.encoder.cache_dir = folder
    with caplog.at_level(logging.WARNING, logger="genmask_jax.encoders.cache"):
        batch = next(make_train_iterator(c, 2, 2, seed=0, process_index=0, process_count=1))
    assert all(batch[task]["context_mask"].any(axis=-1).all() for task in ("seg", "gen"))
    warnings = [r.getMessage() for r in caplog.records if "other pixels" in r.getMessage()]
    assert len(warnings) == 1 and "another JPEG decoder" in warnings[0]

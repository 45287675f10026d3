"""The training loop end to end: exact resume in a new process, the non-finite stop, metrics.jsonl across
a restart; the hooks' quick evaluation across processes and on a stop request."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from train_helpers import make_batch, mesh_of, tiny_config, xla_flags

from genmask_jax.train import checkpointing, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = (2, 1, 1)

_RESUME = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
from train_helpers import mesh_of, tiny_config
from genmask_jax.train import loop
config = tiny_config(total_steps=6, **{{"checkpoint.every_steps": 3}})
loop.train(config, {workdir!r}, mesh=mesh_of({mesh!r}))
"""


def resume_config():
    return tiny_config(total_steps=6, **{"checkpoint.every_steps": 3})


def restored_trainable(workdir, like):
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            like.trainable())
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    out = ckpt.restore(6, abstract)
    ckpt.close()
    return out


@pytest.mark.slow
def test_resume_in_a_new_process_is_exact(tmp_path):
    """6 steps straight == 3 steps, exit, a new process resuming for 3 (data iterator included)."""
    straight, history = loop.train(resume_config(), tmp_path / "straight", mesh=mesh_of(MESH))
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]

    split = tmp_path / "split"
    _, first = loop.train(resume_config(), split, stop_at_step=3, mesh=mesh_of(MESH))
    assert [h["step"] for h in first] == [1, 2, 3]
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    script = _RESUME.format(root=ROOT, tests=os.path.join(ROOT, "tests"), workdir=str(split), mesh=MESH)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env=env, timeout=900)

    resumed = {m["step"]: m for m in loop.read_metrics(split)}
    # Same programs on the same CPU devices with the same data and rngs. Not bitwise: XLA:CPU's threaded
    # reductions may regroup between processes; measured gaps: losses 1.1e-7 relative (1 ulp), so the
    # bounds are ~1e-5, far below any real resume error (a wrong batch or rng changes losses by > 1%).
    for h in history:
        for name in ("loss", "loss_seg", "loss_gen", "grad_norm"):
            np.testing.assert_allclose(resumed[h["step"]][name], h[name], rtol=1e-5, err_msg=str(h["step"]))
    restored = jax.device_get(restored_trainable(split, straight))
    expected = jax.device_get(straight.trainable())
    assert int(restored["step"]) == 6
    gaps = [float(np.max(np.abs(a - b))) for a, b in
            zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(expected["params"]))]
    assert max(gaps) < 1e-5, max(gaps)
    shapes = lambda tree: jax.tree.map(np.shape, tree)
    assert checkpointing.tree_equal_report(shapes(restored), shapes(expected)) == []


@pytest.mark.slow
def test_muon_resume_is_exact(tmp_path, monkeypatch):
    """Muon's partitioned optimizer state round-trips through a checkpoint: 4 steps == 2, restore, 2."""
    config = tiny_config(total_steps=4, **{"checkpoint.every_steps": 2, "optimizer.name": "muon"})
    _, history = loop.train(config, tmp_path / "straight", mesh=mesh_of(MESH))
    loop.train(config, tmp_path / "split", stop_at_step=2, mesh=mesh_of(MESH))
    # The resume reads the checkpoint into the state's shapes: no random initial state is made.
    monkeypatch.setattr(loop, "initial_state", lambda *a, **k: pytest.fail("initial state made"))
    _, resumed = loop.train(config, tmp_path / "split", mesh=mesh_of(MESH))
    assert [h["step"] for h in resumed] == [3, 4]
    # Same process, programs and data: measured identical; 1e-5 relative as in the test above.
    for h, r in zip(history[2:], resumed):
        for name in ("loss", "grad_norm", "update_norm"):
            np.testing.assert_allclose(r[name], h[name], rtol=1e-5, err_msg=f"{name} at {h['step']}")


class ScriptedBatches:
    """Finite batches, except: a NaN image from batch `nan_from` on (as a corrupt example would give), and
    a RuntimeError at batch `fail_at` (a data worker that died)."""

    def __init__(self, nan_from: int | None = None, fail_at: int | None = None):
        self.nan_from, self.fail_at, self.count = nan_from, fail_at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.count += 1
        if self.count == self.fail_at:
            raise RuntimeError("data source died")
        batch = make_batch(self.count, 2, 2)
        if self.nan_from is not None and self.count >= self.nan_from:
            batch["seg"]["image"][:] = np.nan
        return batch


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(total_steps=6, log_every=100, **{"checkpoint.every_steps": 2})
    # NaN from step 3; metrics are fetched at steps 1, 2 (a save) and 4 (a save)
    message = "non-finite loss .* at step 4 .*in steps 3 to 4; stopping.*last good checkpoint is step 2"
    with pytest.raises(FloatingPointError, match=message):
        loop.train(config, tmp_path, data_iterator=ScriptedBatches(nan_from=3), mesh=mesh_of((1, 1, 1)))
    ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [2]
    ckpt.close()
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2]


@pytest.mark.slow
def test_an_exception_after_an_async_save_finishes_the_save(tmp_path, monkeypatch):
    """The third batch fails right after the async save of step 2: the save is waited for (and the hooks
    closed) before the exception leaves `train`, and nothing else is saved."""
    events = []
    for name in ("save", "wait", "close"):
        original = getattr(checkpointing.Checkpointer, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            events.append(_name if _name != "save" else f"save {args[0]}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(checkpointing.Checkpointer, name, spy)
    hooks_close = loop.TrainHooks.close
    monkeypatch.setattr(loop.TrainHooks, "close", lambda self: (events.append("hooks"), hooks_close(self)))
    config = tiny_config(total_steps=4, **{"checkpoint.every_steps": 2, "checkpoint.async_save": True})
    with pytest.raises(RuntimeError, match="data source died"):
        loop.train(config, tmp_path, data_iterator=ScriptedBatches(fail_at=3), mesh=mesh_of((1, 1, 1)))
    assert events == ["save 2", "wait", "close", "hooks"]
    ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [2]
    ckpt.close()


class ObjectStorePath:
    """A `gs://` path over a dict of objects: an object is written whole, and "a" truncates, as gcsfs's
    open does (GCS objects cannot be appended to)."""

    def __init__(self, objects: dict, name: str):
        self.objects, self.name = objects, name

    def __truediv__(self, part: str) -> "ObjectStorePath":
        return ObjectStorePath(self.objects, f"{self.name}/{part}")

    def __str__(self) -> str:
        return self.name

    def exists(self) -> bool:
        return self.name in self.objects

    def read_text(self) -> str:
        return self.objects[self.name]

    def write_text(self, text: str) -> None:
        self.objects[self.name] = text

    def open(self, mode: str = "r"):
        import contextlib
        import io

        @contextlib.contextmanager
        def upload():
            buffer = io.StringIO()
            yield buffer
            self.objects[self.name] = buffer.getvalue()

        assert mode in ("w", "a")
        return upload()


@pytest.mark.parametrize("seed", [2**32 + 7, -1])
def test_a_seed_jax_would_cut_to_32_bits_is_refused_before_anything_is_written(tmp_path, seed):
    config = tiny_config()
    config.seed = seed
    with pytest.raises(ValueError, match=r"config.seed must be in \[0, 2\*\*32\)"):
        loop.train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value,message", [
    ("optimizer.schedule", "cosin", "config.optimizer: unknown schedule 'cosin'; use 'constant' or 'cosine'"),
    ("optimizer.name", "adam", "config.optimizer: unknown optimizer 'adam'; use 'adamw' or 'muon'"),
    ("optimizer.warmup_steps", -1, "config.optimizer: warmup_steps must be >= 0, got -1"),
    ("ema_decay", 1.0, r"config.ema_decay must be in [0, 1) (0: no EMA), got 1.0"),
    ("ema_decay", 1.5, r"config.ema_decay must be in [0, 1) (0: no EMA), got 1.5"),
    ("ema_decay", -0.5, r"config.ema_decay must be in [0, 1) (0: no EMA), got -0.5"),
])
def test_an_optimizer_or_ema_decay_the_loop_cannot_use_is_refused_before_anything_is_written(
    tmp_path, field, value, message
):
    """An optimizer typo was a ValueError traceback after the workdir was made; an EMA decay of 1 kept the
    initial weights for the run (quick eval, evaluate and export read them), > 1 diverged, < 0 was off."""
    from genmask_jax.infer.cli import InputError

    config = tiny_config(total_steps=1, eval_every=0, sample_every=0, **{field: value})
    with pytest.raises(InputError) as error:
        loop.train(config, tmp_path / "run", mesh=mesh_of((1, 1, 1)))
    assert str(error.value) == message
    assert not (tmp_path / "run").exists()


def test_metrics_on_an_object_store_keep_every_line(tmp_path):
    """gs://: the lines of an earlier run and every logged step survive; local: appended as before."""
    earlier = '{"step": 1, "loss": 3.0}\n'
    objects = {"gs://bucket/run/metrics.jsonl": earlier}
    (tmp_path / "metrics.jsonl").write_text(earlier)
    for workdir in (ObjectStorePath(objects, "gs://bucket/run"), tmp_path):
        writer = loop.MetricsWriter(workdir)
        writer.write(2, {"loss": 2.0})
        writer.write(3, {"loss": 1.0})
    lines = objects["gs://bucket/run/metrics.jsonl"].splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert loop.read_metrics(tmp_path) == [json.loads(line) for line in lines]


def test_stopping_after_an_error_logs_the_cleanup_errors_and_runs_every_step(caplog):
    """After a failure, a save that cannot finish (e.g. the bucket refused it) is logged: the failure
    that stopped training stays the one reported, and the hooks are still closed."""
    calls = []

    class Refused:
        def wait(self):
            calls.append("wait")
            raise PermissionError(13, "Permission denied", "gs://bucket/run/checkpoints/2")

        def close(self):
            calls.append("close")

    class Hooks:
        def close(self):
            calls.append("hooks")

    loop._finish_quietly(Refused(), Hooks())
    assert calls == ["wait", "close", "hooks"]
    assert "closing the save failed too" in caplog.text and "Permission denied" in caplog.text


def poisoned_step(monkeypatch, at: int):
    """The loop's step, except that step `at` ends with NaN parameters while its loss stays finite, as a
    non-finite gradient would leave them (the loss is computed before the update). param_norm, computed
    on the new parameters, reports it, as the real step's would."""
    import optax

    make = loop.make_configured_train_step

    def make_poisoned(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def fn(state, batch, rng):
            state, metrics = step_fn(state, batch, rng)
            if int(state.step) == at:
                state = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
                metrics = {**metrics, "param_norm": optax.global_norm(state.params)}
            return state, metrics

        return fn

    monkeypatch.setattr(loop, "make_configured_train_step", make_poisoned)


@pytest.mark.slow
@pytest.mark.parametrize("way", ["save", "stop"])
def test_non_finite_parameters_are_never_saved(tmp_path, monkeypatch, way):
    """A finite loss with non-finite new parameters stops training before they are saved, by the periodic
    save (step 4) or by the save on a stop request (step 3, a step whose metrics are not logged)."""
    poisoned_step(monkeypatch, at=4 if way == "save" else 3)
    if way == "stop":
        monkeypatch.setattr(loop.TrainHooks, "after_step", lambda self, step, state: step == 3)
    config = tiny_config(total_steps=4, log_every=100, **{"checkpoint.every_steps": 2})
    step = 4 if way == "save" else 3
    message = rf"non-finite param_norm nan at step {step} .*last good checkpoint is step 2 "
    with pytest.raises(FloatingPointError, match=message):
        loop.train(config, tmp_path, data_iterator=ScriptedBatches(), mesh=mesh_of((1, 1, 1)))
    ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [2]
    ckpt.close()
    assert [m["step"] for m in loop.read_metrics(tmp_path)] == [1, 2]


@pytest.mark.slow
def test_a_restart_after_a_kill_logs_each_step_once(tmp_path, monkeypatch):
    """A run that dies between checkpoints (at step 4, after the one of step 2) logged step 3, which the
    restart runs again: metrics.jsonl keeps the restart's line only. The quick evaluation's metrics (due
    every 3 steps) have lines of their own."""
    from genmask_jax.train.hooks import QuickEval

    monkeypatch.setattr(QuickEval, "segmentation", lambda self, step, state: {"giou": step / 10, "ciou": 0.5})
    config = tiny_config(total_steps=5, eval_every=3, sample_every=0, **{"checkpoint.every_steps": 2})
    with pytest.raises(RuntimeError, match="data source died"):
        loop.train(config, tmp_path, data_iterator=ScriptedBatches(fail_at=4), mesh=mesh_of((1, 1, 1)))
    died = loop.read_metrics(tmp_path)
    assert [m["step"] for m in died] == [1, 2, 3, 3]
    assert died[3] == {"step": 3, "quick_eval/giou": 0.3, "quick_eval/ciou": 0.5}
    _, history = loop.train(config, tmp_path, data_iterator=ScriptedBatches(), mesh=mesh_of((1, 1, 1)))
    metrics = loop.read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3, 3, 4, 5]
    assert metrics[:2] == died[:2] and [m for m in metrics[2:] if "loss" in m] == history
    assert metrics[3] == died[3]


def test_a_restarted_metrics_writer_drops_the_lines_it_runs_again(tmp_path):
    """Lines after the start step go, and a last line cut short by a kill; local and object store alike."""
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    text = "\n".join(lines) + '\n{"step": 5, "lo'
    objects = {"gs://bucket/run/metrics.jsonl": text}
    (tmp_path / "metrics.jsonl").write_text(text)
    for workdir in (ObjectStorePath(objects, "gs://bucket/run"), tmp_path):
        writer = loop.MetricsWriter(workdir, start_step=2)
        writer.write(3, {"loss": 0.5})
    assert objects["gs://bucket/run/metrics.jsonl"] == "\n".join([*lines[:2], '{"step": 3, "loss": 0.5}\n'])
    assert (tmp_path / "metrics.jsonl").read_text() == objects["gs://bucket/run/metrics.jsonl"]
    # The lines dropped stay beside it (a fresh run in a reused workdir drops every line).
    dropped = "\n".join(lines[2:]) + '\n{"step": 5, "lo\n'
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "metrics.jsonl.prev"]
    assert (tmp_path / "metrics.jsonl.prev").read_text() == dropped
    assert objects["gs://bucket/run/metrics.jsonl.prev"] == dropped
    loop.MetricsWriter(tmp_path, start_step=3)  # nothing after step 3: the file is left as it is
    assert [m["step"] for m in loop.read_metrics(tmp_path)] == [1, 2, 3]
    assert (tmp_path / "metrics.jsonl.prev").read_text() == dropped
    # A fresh run (step 0) that restarts in turn: the older lines stay, the new ones come after them.
    for workdir in (ObjectStorePath(objects, "gs://bucket/run"), tmp_path):
        loop.MetricsWriter(workdir, start_step=0).write(1, {"loss": 9.0})
        loop.MetricsWriter(workdir, start_step=0)
    again = dropped + "".join(line + "\n" for line in [*lines[:2], '{"step": 3, "loss": 0.5}']) + (
        '{"step": 1, "loss": 9.0}\n'
    )
    assert (tmp_path / "metrics.jsonl.prev").read_text() == again
    assert objects["gs://bucket/run/metrics.jsonl.prev"] == again


def recorded_hooks(tmp_path, monkeypatch, others_ok=True, fails=()):
    """TrainHooks with a segmentation and a generation due at every step, on process 0 of two: this
    process's input reads of `fails` raise, the other process reports `others_ok`. The evaluations (the
    collectives) are recorded in `hooks.calls`, and the flags this process contributes in `hooks.sent`."""
    from genmask_jax.parallel.sharding import rules_from_config
    from genmask_jax.train import hooks as train_hooks

    config = tiny_config(eval_every=1, sample_every=1)
    rules = rules_from_config(config.sharding.logical_axis_rules)
    hooks = loop.TrainHooks(config, None, tmp_path, mesh_of((1, 1, 1)), rules, install_signals=False)
    hooks.calls, hooks.sent = [], []
    quick = hooks.quick_eval

    def transient_error(*args):
        raise OSError("transient read error on this host")

    if "segmentation" in fails:
        quick.segmentation_batch = transient_error
    if "generation" in fails:
        quick._generation_examples = transient_error
    quick.segmentation = lambda step, state: hooks.calls.append(("segmentation", step))
    quick.generation = lambda step, state: hooks.calls.append(("generation", step))

    def gather(ok):
        hooks.sent.append(bool(ok))
        return np.asarray([ok, others_ok])

    monkeypatch.setattr(train_hooks, "_gather_flags", gather, raising=False)
    return hooks


def test_the_wait_for_queued_steps_before_a_quick_eval_counts_as_training(tmp_path, monkeypatch):
    """The quick evaluation reads the live parameters, so it first waits for the train steps still queued
    on the device; that wait was timed with the evaluation and left out of the rates (steps/s, MFU and
    ETA up to 2x too high in the window holding an evaluation). Only the evaluation itself is paused."""
    from genmask_jax.train import hooks as train_hooks

    clock = {"now": 0.0, "queued": 5.0}  # seconds of device work still queued when after_step starts

    def wait_for_device(state):
        clock["now"] += clock["queued"]
        clock["queued"] = 0.0
        return state

    monkeypatch.setattr(train_hooks, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    monkeypatch.setattr(jax, "block_until_ready", wait_for_device)
    hooks = recorded_hooks(tmp_path, monkeypatch)

    def evaluate(name):
        def run(step, state):  # reads the parameters (waits for the queue), then takes 1 s
            wait_for_device(state)
            clock["now"] += 1.0

        return run

    hooks.quick_eval.segmentation, hooks.quick_eval.generation = evaluate("seg"), evaluate("gen")
    paused = []
    monkeypatch.setattr(hooks.logger, "pause", paused.append)
    assert not hooks.after_step(1, object())
    hooks.close()
    assert paused == [2.0]  # the two evaluations, not the 5 s of queued training


def test_quick_eval_runs_only_when_every_process_read_its_inputs(tmp_path, monkeypatch, caplog):
    """An input read that fails on one host only must not leave the others in the evaluation's collective
    (they would wait forever): every process takes part in the agreement and all skip together."""
    # The other process failed both reads: this one, whose reads succeeded, runs neither.
    hooks = recorded_hooks(tmp_path / "other_failed", monkeypatch, others_ok=False)
    assert not hooks.after_step(1, None)
    assert hooks.calls == [] and hooks.sent == [True, True]
    assert hooks.quick_eval.generation_inputs() is None  # samples off for the run, as on the other process
    hooks.close()

    # This process fails both reads: it still takes part in each agreement, then skips.
    hooks = recorded_hooks(tmp_path / "this_failed", monkeypatch, fails=("segmentation", "generation"))
    assert not hooks.after_step(1, None)
    assert hooks.calls == [] and hooks.sent == [False, False]
    hooks.close()
    assert "transient read error" in caplog.text

    # This host finds no captions (a short split, a cache being extended) without an error: it must not
    # skip the collective alone either.
    hooks = recorded_hooks(tmp_path / "this_has_none", monkeypatch)
    hooks.quick_eval._generation_examples = lambda *args: None
    assert not hooks.after_step(1, None)
    assert hooks.calls == [("segmentation", 1)] and hooks.sent == [True, False]
    hooks.close()

    hooks = recorded_hooks(tmp_path / "all_ok", monkeypatch)
    assert not hooks.after_step(1, None)
    assert hooks.calls == [("segmentation", 1), ("generation", 1)] and hooks.sent == [True, True]
    hooks.close()


def test_samples_switched_off_on_every_process_say_so(tmp_path, monkeypatch, caplog):
    """Too few captions on every process turned the generation samples off for the run without a word
    (the warning named only the processes that lacked them when others had them)."""
    hooks = recorded_hooks(tmp_path, monkeypatch, others_ok=False)
    hooks.quick_eval._generation_examples = lambda *args: None
    with caplog.at_level("WARNING", logger="genmask_jax.train.hooks"):
        assert not hooks.after_step(1, None)
        assert not hooks.after_step(2, None)
    assert hooks.calls == []  # (the other process lacks its segmentation inputs too)
    assert caplog.text.count("no generation samples in this run: data.gen_sources='shapes' has fewer than "
                             "the quick evaluation's 4 usable captions in split 'val'") == 1
    hooks.close()


def quick_eval_of(tmp_path, mesh, num_examples):
    from genmask_jax.parallel.sharding import rules_from_config
    from genmask_jax.train.hooks import MetricsLogger, QuickEval

    config = tiny_config()
    rules = rules_from_config(config.sharding.logical_axis_rules)
    logger = MetricsLogger(tmp_path, total_steps=1, examples_per_step=1, enabled=True)
    return QuickEval(config, None, mesh, rules, tmp_path, logger, num_examples=num_examples)


def test_quick_eval_panels_wrap_into_a_grid_of_at_most_eight_lines(tmp_path):
    """Rounded up to a pod's 64 batch shards, the generation panel was one row of 64 images (32768 px wide
    at 512^2) and the segmentation panel 64 rows: now at most 8 columns, and 8 rows of triplets."""
    import jax.numpy as jnp
    from PIL import Image

    n, size, length, dim = 12, 4, 3, 2
    rng = np.random.default_rng(0)
    quick = quick_eval_of(tmp_path, mesh_of((1, 1, 1)), n)
    quick._gen_inputs = ([f"caption {i}" for i in range(n)], np.zeros((n, length, dim), np.float32),
                         np.ones((n, length), bool))
    quick._generate = lambda params, vae, context, mask: jnp.zeros((n, size, size, 3))
    quick._seg_batch = {"image": rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32),
                        "context": np.zeros((n, length, dim), np.float32),
                        "context_mask": np.ones((n, length), bool),
                        "valid": np.ones(n, bool), "mask": np.ones((n, size, size), np.float32),
                        "ignore": np.zeros((n, size, size), bool)}
    quick._segment = lambda params, vae, image, context, mask, index: jnp.ones((n, size, size), bool)
    state = SimpleNamespace(params={}, ema_params=None, frozen={})
    quick.generation(3, state)
    quick.segmentation(3, state)
    quick.logger.close()
    read = lambda name: np.asarray(Image.open(tmp_path / "samples" / f"step_0000003_{name}.png"))  # noqa: E731
    gap = 2
    assert read("generation").shape == (2 * size + gap, 8 * size + 7 * gap, 3)  # rows of 8 and 4
    # 2 examples (image | prediction | truth) a row, 6 rows
    assert read("segmentation").shape == (6 * size + 5 * gap, 6 * size + 5 * gap, 3)


def test_quick_eval_logs_its_examples_rounded_up_to_the_batch_shards(tmp_path, caplog):
    with caplog.at_level("INFO", logger="genmask_jax.train.hooks"):
        quick = quick_eval_of(tmp_path, mesh_of((1, 4, 1)), 3)
    quick.logger.close()
    assert quick.num_examples == 4
    assert ("quick evaluation: 4 examples (quick_eval.num_examples 3 rounded up to a multiple of the mesh's "
            "4 batch shards)") in caplog.text


def test_a_stop_request_skips_the_due_evaluations(tmp_path, monkeypatch):
    """After SIGTERM the grace period is for the checkpoint: no evaluation runs, no input is read."""
    hooks = recorded_hooks(tmp_path, monkeypatch)
    hooks.preemption = SimpleNamespace(should_stop=lambda step: True, close=lambda: None)
    assert hooks.after_step(2, None)
    assert hooks.calls == [] and hooks.sent == []
    hooks.close()

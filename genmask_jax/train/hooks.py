"""Training hooks that `train.loop` calls in a few lines: logging, quick evaluation with samples,
profiling and preemption.

    hooks = TrainHooks(config, model, workdir, mesh, rules, start_step=start)
    for step in ...:
        ...
        hooks.before_step(step, batch)            # FLOPs for the MFU; starts the profiler trace when due
        hooks.log(done, metrics)                  # when metrics are fetched
        if hooks.after_step(done, state):         # True on SIGTERM (then no eval); else quick eval when due
            save a checkpoint at `done` (unless just saved) and break
    hooks.close()

- `MetricsLogger`: loss per task, lr, norms, steps/s, examples/s, model TFLOP/s per device, MFU and ETA
  to stdout (the `logging` module) and to TensorBoard (tensorboardX, `<workdir>/tensorboard`), process 0
  only.
- `QuickEval`: every `config.eval_every` steps segments a fixed small batch of the `val` split
  (gIoU / cIoU at the model resolution, a panel image | prediction | ground truth per example); every
  `config.sample_every` steps generates images for fixed captions. Panels go to TensorBoard and to
  `<workdir>/samples/step_<N>_{segmentation,generation}.png`. Each host reads the inputs; with several
  processes they agree that every one has them before the (collective) evaluation, else all skip it.
- `StepProfiler`: with `config.profile.num_steps` > 0, a `jax.profiler` trace of that many steps from
  `config.profile.first_step` (after compilation and warm-up), on process 0, into
  `<workdir>/tensorboard/plugins/profile/` (TensorBoard's profile tab, XProf, Perfetto).
- `Preemption`: SIGTERM sets a flag (single process); with several processes JAX's preemption sync
  point makes every process stop at the same step. The loop then saves and returns; no evaluation runs
  at that step, as it would spend the time between SIGTERM and the kill.
"""

import logging
import math
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from genmask_jax.flops import devices_per_chip, peak_bf16_flops, train_step_model_flops
from genmask_jax.parallel import multihost
from genmask_jax.parallel.sharding import batch_shard_count, batch_sharding

log = logging.getLogger(__name__)

TASK_BATCH_KEYS = ("seg", "gen")
# A sample panel's rows (segmentation: image | prediction | truth side by side) or columns (generation) at
# most: the quick evaluation's examples round up to the batch shards, 64 on a pod, a 32768 px wide row.
PANEL_LINES = 8


class MetricsLogger:
    """Scalars to stdout and TensorBoard; rates measured between successive calls.

    Once `set_model_flops` has the useful FLOPs of a step, the rates include `model_tflops_per_device`
    (those FLOPs per second over the devices, in TFLOP/s) and `mfu` (that over the device's peak bf16
    FLOP/s, `flops.peak_bf16_flops`; left out where the peak is unknown, as on a CPU).
    """

    def __init__(
        self,
        workdir: str | epath.Path,
        total_steps: int,
        examples_per_step: int,
        start_step: int = 0,
        enabled: bool | None = None,
    ):
        self.total_steps, self.examples_per_step = total_steps, examples_per_step
        self.flops_per_device_step, self.peak_flops = 0.0, None
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            # A restart runs again the steps after its checkpoint (all of them from step 0): their old
            # events go, or the curves hold two values for each and draw backwards.
            self.writer = SummaryWriter(str(epath.Path(workdir) / "tensorboard"), purge_step=start_step + 1)
        self._last = (start_step, None)

    def set_model_flops(self, flops_per_step: float, devices) -> None:
        """The useful FLOPs of one step on the whole mesh (`flops.train_step_model_flops`) and its devices."""
        devices = list(devices)
        self.flops_per_device_step = flops_per_step / len(devices)
        self.peak_flops = peak_bf16_flops(devices[0].device_kind, devices_per_chip(devices))

    def rates(self, step: int) -> dict[str, float]:
        """steps/s, examples/s, model TFLOP/s per device, MFU and ETA (s) since the previous call (none on
        the first call)."""
        now = time.perf_counter()
        last_step, last_time = self._last
        self._last = (step, now)
        if last_time is None or step <= last_step:
            return {}
        steps_per_s = (step - last_step) / (now - last_time)
        rates = {
            "steps_per_s": steps_per_s,
            "examples_per_s": steps_per_s * self.examples_per_step,
            "eta_s": (self.total_steps - step) / steps_per_s,
        }
        if self.flops_per_device_step:
            flops_per_s = self.flops_per_device_step * steps_per_s
            rates["model_tflops_per_device"] = flops_per_s / 1e12
            if self.peak_flops:
                rates["mfu"] = flops_per_s / self.peak_flops
        return rates

    def pause(self, seconds: float) -> None:
        """Leaves `seconds` (spent outside training, e.g. in a quick evaluation) out of the rates."""
        last_step, last_time = self._last
        if last_time is not None:
            self._last = (last_step, last_time + seconds)

    def __call__(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> dict[str, float]:
        values = {k: float(v) for k, v in metrics.items() if k != "steps_per_s"}
        if prefix == "train":
            values.update(self.rates(step))
        if not self.enabled:
            return values
        text = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()) if k != "eta_s")
        eta = f" eta {format_seconds(values['eta_s'])}" if "eta_s" in values else ""
        log.info("[%s] step %d/%d: %s%s", prefix, step, self.total_steps, text, eta)
        for key, value in values.items():
            if math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()
        return values

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """uint8 `(H, W, 3)` to TensorBoard."""
        if self.enabled:
            self.writer.add_image(tag, image, step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


class StepProfiler:
    """A `jax.profiler` trace of steps `first_step .. first_step + num_steps - 1` (0-based step indices;
    on resume, from the first step run at or after `first_step`)."""

    def __init__(self, log_dir: str | epath.Path, first_step: int, num_steps: int, enabled: bool):
        self.log_dir, self.first_step, self.num_steps = str(log_dir), first_step, num_steps
        self.enabled = enabled and num_steps > 0
        self.stop_at = None  # the `done` count at which the running trace stops

    def before_step(self, step: int) -> None:
        end = self.first_step + self.num_steps
        if self.enabled and self.stop_at is None and self.first_step <= step < end:
            jax.profiler.start_trace(self.log_dir)
            self.stop_at = end
            log.info("profiling steps %d-%d into %s", step + 1, self.stop_at, self.log_dir)

    def stops_after(self, done: int) -> bool:
        return self.stop_at is not None and done >= self.stop_at

    def after_step(self, done: int, state: Any) -> None:
        if self.stops_after(done):
            jax.block_until_ready(state)  # the traced steps' device work, not just their dispatch
            self.stop()

    def stop(self) -> None:
        if self.stop_at is not None:
            jax.profiler.stop_trace()
            self.stop_at, self.enabled = None, False
            log.info("profile written to %s (open with TensorBoard's profile tab or XProf)", self.log_dir)


class Preemption:
    """Stop requests: SIGTERM (single process) or JAX's preemption sync point (several processes)."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested = False
        self._previous = {}
        self.multiprocess = jax.process_count() > 1
        # With several processes JAX's own notifier owns SIGTERM; a Python handler would replace it.
        if not self.multiprocess and threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        del frame
        log.warning("received signal %d: saving a checkpoint after this step, then stopping", signum)
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if self.multiprocess:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # no preemption sync manager (distributed runtime without it)
                return self.requested
        return self.requested

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _gather_flags(ok: bool) -> np.ndarray:
    """`(process_count,)` bool: `ok` of every process, in process order. With several processes a collective
    that every process must enter."""
    return multihost.gather_ints(int(ok)).astype(bool)


def inference_params(state) -> Any:
    """The EMA parameters when the run keeps them, else the live ones; in the live ones' dtypes, as
    inference restores them (the EMA is kept in float32: train/state.py)."""
    if state.ema_params is None:
        return state.params
    return jax.tree.map(lambda e, p: e.astype(p.dtype), state.ema_params, state.params)


def _global_array(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _host(array: jax.Array) -> np.ndarray:
    """A replicated global array's value on this host."""
    return np.asarray(array.addressable_data(0))


def wrap(items: list[list], per_row: int) -> list[list]:
    """Panel rows of `per_row` items each (the last may hold fewer), an item being a list of tiles."""
    return [sum(items[i : i + per_row], []) for i in range(0, len(items), per_row)]


class QuickEval:
    """A fixed small segmentation batch and fixed generation prompts, evaluated on the live state.

    Every process reads the same examples (the first `num_examples` of `split`), so the inputs are
    global arrays built from host copies; outputs come back replicated.
    """

    def __init__(
        self,
        config,
        model,
        mesh,
        rules,
        workdir: str | epath.Path,
        logger: MetricsLogger,
        num_examples: int = 8,
        split: str = "val",
        gen_steps: int = 20,
        guidance_scale: float = 5.0,
        seed: int = 0,
    ):
        self.config, self.model, self.mesh, self.rules = config, model, mesh, rules
        self.samples = epath.Path(workdir) / "samples"
        self.logger, self.split, self.seed = logger, split, seed
        self.gen_steps, self.guidance_scale = gen_steps, guidance_scale
        self.sharding, multiple = batch_sharding(mesh, rules), batch_shard_count(mesh, rules)
        self.num_examples = -(-num_examples // multiple) * multiple
        if self.num_examples != num_examples:
            log.info("quick evaluation: %d examples (quick_eval.num_examples %d rounded up to a multiple of "
                     "the mesh's %d batch shards)", self.num_examples, num_examples, multiple)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self._seg_batch = self._gen_inputs = None
        self._segment = self._generate = None

    # Inputs, built on first use and kept (the same examples at every evaluation).

    def segmentation_batch(self) -> dict:
        if self._seg_batch is None:
            from genmask_jax.data.pipeline import make_eval_iterator

            iterator = make_eval_iterator(
                self.config.data, self.split, self.num_examples, process_index=0, process_count=1
            )
            batch, _ = next(iter(iterator.iter_with_meta()))
            self._seg_batch = batch
        return self._seg_batch

    def generation_inputs(self) -> tuple[list[str], np.ndarray, np.ndarray] | None:
        """(prompts, context, context mask) of the first `num_examples` generation-source captions of
        `split`, or None when there is no generation data to draw prompts from (or `inputs_failed`)."""
        if self._gen_inputs is None:
            self._gen_inputs = self._load_generation_inputs() or ()
        return self._gen_inputs or None

    def prepare(self, name: str) -> bool:
        """Reads (once) this host's inputs of the evaluation `name` ("segmentation" or "generation");
        False if that failed (the reason logged) or there are none (no generation data)."""
        try:
            if name == "segmentation":
                self.segmentation_batch()
            elif self.generation_inputs() is None:
                return False
        except Exception as e:  # noqa: BLE001  (evaluations are optional: say why and go on training)
            if name == "generation":
                log.warning("no generation samples: %s: %s", type(e).__name__, e)
            else:
                log.exception("reading the quick evaluation's %s inputs failed", name)
            return False
        return True

    def inputs_failed(self, name: str) -> None:
        """Called on every process when the inputs of `name` failed on any. Generation samples stay off
        for the run (each try may load the text encoder again); segmentation tries again at its next
        evaluation."""
        if name == "generation":
            self._gen_inputs = ()

    def _load_generation_inputs(self):
        data = self.config.data
        cache = None
        if data.encoder.cache_dir:
            from genmask_jax.encoders import fingerprint
            from genmask_jax.encoders.cache import EmbeddingCache

            cache = EmbeddingCache(data.encoder.cache_dir, fingerprint(data.encoder))
        examples, splits = self._generation_examples(self.split, cache), [self.split]
        if examples is None and cache is not None and data.train_split != self.split:
            # precompute caches the generation sources' training split only
            examples = self._generation_examples(data.train_split, cache)
            splits.append(data.train_split)
        if examples is None:
            cached = " with cached embeddings" if cache is not None else ""
            log.warning(
                "no generation samples in this run: data.gen_sources=%r has fewer than the quick "
                "evaluation's %d usable captions%s in split %s (--config.sample_every=0 turns them off)",
                data.gen_sources, self.num_examples, cached, " or ".join(map(repr, splits)),
            )
            return None
        texts = [e["text"] for e, _ in examples]
        if cache is not None:
            context, mask = np.stack([p[0] for _, p in examples]), np.stack([p[1] for _, p in examples])
        else:
            from genmask_jax.encoders import make_encoder

            context, mask = make_encoder(data.encoder).encode(None, texts)
        return texts, context.astype(np.float32), mask.astype(bool)

    def _generation_examples(self, split: str, cache) -> list[tuple[dict, tuple | None]] | None:
        """The first `num_examples` usable examples of the generation sources' `split`, each with its
        (context, mask) from the cache (None without one). A bad example (`BadExample`: one the precompute
        could not encode, a caption missing) is passed over, as training passes over it, the same on every
        process; None if the split has too few, or (with a cache) the cache lacks one of them. Other
        errors propagate: the caller turns the samples off on every process."""
        from genmask_jax.data.skips import BadExample, skip_reason
        from genmask_jax.data.sources import make_task_source

        data = self.config.data
        source = make_task_source(data.gen_sources, split, data, "gen")
        if source is None:
            return None
        examples = []
        for index in range(min(len(source), self.num_examples + data.max_consecutive_skips)):
            if len(examples) == self.num_examples:
                break
            if cache is not None and cache.missing([source.example_id(index)]):
                return None
            try:
                example = source[index]
                pair = cache.lookup(example["id"], example["text"]) if cache is not None else None
            except BadExample as e:  # its data, the same on every process (not a passing read error)
                log.info("generation samples: example %d of %s passed over: %s", index, split, skip_reason(e))
                continue
            examples.append((example, pair))
        return examples if len(examples) == self.num_examples else None

    # Compiled functions.

    def _segment_fn(self):
        if self._segment is None:
            from genmask_jax.infer.segmenter import predict_scores

            def fn(params, vae, image, context, context_mask, index):
                key = jax.random.key(self.seed)
                return predict_scores(self.model, params, vae, image, context, context_mask, index, key) > 0

            self._segment = jax.jit(fn, out_shardings=self.replicated)
        return self._segment

    def _generate_fn(self):
        if self._generate is None:

            def fn(params, vae, context, context_mask):
                return self.model.generate(
                    params,
                    vae,
                    context,
                    context_mask,
                    jax.random.key(self.seed),
                    tuple(self.config.data.resolution),
                    num_steps=self.gen_steps,
                    guidance_scale=self.guidance_scale,
                )

            self._generate = jax.jit(fn, out_shardings=self.replicated)
        return self._generate

    # Evaluations.

    def segmentation(self, step: int, state) -> dict[str, float]:
        """gIoU / cIoU of the fixed batch at the model resolution; writes the panel."""
        import flax.linen as nn

        from genmask_jax.eval.metrics import segmentation_metrics
        from genmask_jax.infer.images import panel, to_uint8, write_image

        batch = self.segmentation_batch()
        inputs = [
            _global_array(np.asarray(batch[k]), self.sharding) for k in ("image", "context", "context_mask")
        ]
        index = _global_array(np.arange(self.num_examples, dtype=np.int32), self.sharding)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            masks = _host(
                self._segment_fn()(inference_params(state), state.frozen.get("vae"), *inputs, index)
            )
        valid = np.asarray(batch["valid"], bool)
        gt = np.asarray(batch["mask"]) > 0.5
        metrics = segmentation_metrics(masks[valid], gt[valid], np.asarray(batch["ignore"])[valid])
        values = {"giou": metrics["giou"], "ciou": metrics["ciou"]}
        self.logger(step, values, prefix="quick_eval")
        if self.logger.enabled:
            images = to_uint8(batch["image"])
            triplets = [[im, m, g] for im, m, g in zip(images[valid], masks[valid], gt[valid])]
            grid = panel(wrap(triplets, max(1, -(-len(triplets) // PANEL_LINES))))
            self.logger.image(step, "quick_eval/image_prediction_truth", grid)
            write_image(grid, self.samples / f"step_{step:07d}_segmentation.png")
        return values

    def generation(self, step: int, state) -> None:
        """Images for the fixed captions; writes the panel."""
        import flax.linen as nn

        from genmask_jax.infer.images import panel, to_uint8, write_image

        inputs = self.generation_inputs()
        if inputs is None:
            return
        prompts, context, mask = inputs
        args = [_global_array(context, self.sharding), _global_array(mask, self.sharding)]
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            rgb = _host(self._generate_fn()(inference_params(state), state.frozen.get("vae"), *args))
        if self.logger.enabled:
            grid = panel(wrap([[x] for x in to_uint8(rgb)], PANEL_LINES))
            self.logger.image(step, "samples/generation", grid)
            write_image(grid, self.samples / f"step_{step:07d}_generation.png")
            (self.samples / f"step_{step:07d}_generation.txt").write_text("\n".join(prompts) + "\n")


class TrainHooks:
    """Everything the loop calls: `log`, `after_step` (True = stop now; `evaluated` then holds the quick
    evaluation's metrics of that step, for metrics.jsonl), `close`.

    Config fields read (all optional): `log_every` (the loop's), `eval_every` and `sample_every`
    (0 = never), `quick_eval.{num_examples, split, gen_steps, guidance_scale}`,
    `profile.{first_step, num_steps}` (num_steps 0 = never).
    """

    def __init__(
        self, config, model, workdir, mesh, rules, start_step: int = 0, install_signals: bool = True
    ):
        self.config, self.model, self.devices = config, model, list(mesh.devices.flat)
        batch = config.get("batch", {})
        examples = sum(int(batch.get(k, 0)) for k in TASK_BATCH_KEYS)
        self.logger = MetricsLogger(workdir, int(config.total_steps), examples, start_step)
        self.eval_every = int(config.get("eval_every", 0) or 0)
        self.sample_every = int(config.get("sample_every", 0) or 0)
        quick = dict(config.get("quick_eval", None) or {})
        self.quick_eval = None
        if self.eval_every or self.sample_every:
            self.quick_eval = QuickEval(config, model, mesh, rules, workdir, self.logger, **quick)
        self.preemption = Preemption() if install_signals else None
        self.evaluated: dict[str, float] = {}
        profile = config.get("profile", None) or {}
        self.profiler = StepProfiler(
            epath.Path(workdir) / "tensorboard",
            int(profile.get("first_step", 0)),
            int(profile.get("num_steps", 0)),
            enabled=jax.process_index() == 0,
        )

    def before_step(self, step: int, batch: Mapping[str, Any]) -> None:
        """Called before step `step` (0-based) runs on `batch` (the global batch)."""
        if not self.logger.flops_per_device_step:
            self.logger.set_model_flops(train_step_model_flops(self.model, batch), self.devices)
        self.profiler.before_step(step)

    def log(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
        return self.logger(step, metrics)

    def after_step(self, step: int, state: Any) -> bool:
        """True if training must stop now (then nothing else runs: the grace period after SIGTERM is for
        the checkpoint); else runs the periodic evaluations that are due at `step` and returns False."""
        due = [
            name
            for name, every in (("segmentation", self.eval_every), ("generation", self.sample_every))
            if every and step % every == 0
        ]
        if due or self.profiler.stops_after(step):
            # Both wait for the steps still queued on the device: that wait is training time, left in the
            # rates; only what follows is paused (it made steps/s and MFU up to 2x too high).
            jax.block_until_ready(state)
        start = time.perf_counter()
        self.evaluated = {}
        self.profiler.after_step(step, state)
        if self.preemption is not None and self.preemption.should_stop(step):
            if due:
                log.info("stopping: no quick evaluation (%s) at step %d", ", ".join(due), step)
            return True
        for name in due:
            self._evaluate(name, step, state)
        self.logger.pause(time.perf_counter() - start)
        return False

    def _evaluate(self, name: str, step: int, state: Any) -> None:
        """The quick evaluation `name` at `step`, if every process has read its inputs.

        The evaluation is a collective: had a read failed on one host only, that host would skip it while
        the others waited for it forever. A failure in the evaluation itself (the same on every host, or
        process 0's writing after the collective) is logged: a failing sample must not kill a long run.
        """
        ready = _gather_flags(self.quick_eval.prepare(name))
        if not ready.all():
            if ready.any():  # else no process has them (no generation data, or the same error everywhere)
                log.warning(
                    "quick evaluation %s at step %d skipped on every process: its inputs are missing "
                    "on process(es) %s",
                    name,
                    step,
                    ", ".join(map(str, np.flatnonzero(~ready))),
                )
            self.quick_eval.inputs_failed(name)
            return
        try:
            values = getattr(self.quick_eval, name)(step, state)
        except Exception:  # noqa: BLE001
            log.exception("quick evaluation %s at step %d failed; training continues", name, step)
            return
        self.evaluated.update({f"quick_eval/{k}": v for k, v in (values or {}).items()})

    def close(self) -> None:
        self.profiler.stop()
        if self.preemption is not None:
            self.preemption.close()
        self.logger.close()

"""What every command-line entry point shares: the `--config` flag, flag parsing that turns bad input
into one clear line, logging to stdout, and the errors that count as the user's (not the code's).

Commands with a `--checkpoint` flag (evaluate, segment, generate) default to the config saved with the
checkpoint. `--config.field=value` overrides without `--config` apply to that saved config: the
parser adds `--config=configs/checkpoint.py:<step folder>` and pins `--checkpoint` to the same step
folder, so a training run that saves a newer step meanwhile cannot give the weights of one step and
the config of another.

Bad input (a misspelt config field, a missing file, checkpoint or converted weights, an unreadable
image, an empty prompt, an output that cannot be written, a context the configured encoder or embedding
cache cannot give) ends the command with `<prog>: error: <one line>` on stderr and exit status 2
(flags) or 1 (inputs), no traceback. Anything else is a bug and keeps its traceback.
"""

import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from convert.checkpoint_io import ConversionError
from genmask_jax.data.sources import DataConfigError
from genmask_jax.encoders.base import ContextError
from genmask_jax.infer import checkpoint
from genmask_jax.infer.checkpoint import CheckpointError
from genmask_jax.models.build import VAEConfigMismatch
from genmask_jax.parallel import host, multihost

FLAGS = flags.FLAGS
# `define_config_flag` defines --config for the command that calls it: that module's --help lists it.
flags.disclaim_key_flags()


class InputError(ValueError):
    """Bad user input, reported as one line."""


# FileExistsError and NotADirectoryError: an output path under a file (outputs are checked before the
# model runs; a file made meanwhile still gets one line). ConversionError: converted or PyTorch weights
# (`config.init_from`, `config.vae_from`) that are missing or unreadable. DataConfigError: a data source
# name or data field the pipelines cannot read.
USER_ERRORS = (
    InputError, CheckpointError, ContextError, VAEConfigMismatch, ConversionError, DataConfigError,
    FileNotFoundError, PermissionError, IsADirectoryError, FileExistsError, NotADirectoryError,
)


def define_config_flag():
    """`--config=configs/<exp>.py[:args]` with `--config.a.b=value` overrides; unknown fields fail."""
    return config_flags.DEFINE_config_file(
        "config",
        None,
        "Experiment config file, e.g. configs/genmask.py or configs/genmask.py:variant=paper; override "
        "fields with --config.field=value (unknown fields are rejected). Inference commands default to "
        "the config saved with the checkpoint.",
        lock_config=True,
    )


def define_seed_flag():
    """`--seed`, refused when parsed unless in [0, 2**32): without jax_enable_x64 JAX keeps a seed's low
    32 bits, so --seed=4294967303 would draw the noise of --seed=7 (`segmenter.noise_key`)."""
    return flags.DEFINE_integer(
        "seed", 0, "Noise seed (0 to 2**32 - 1).", lower_bound=0, upper_bound=2**32 - 1
    )


def one_line(error: BaseException) -> str:
    """A flag/config error as one readable line (the last meaningful line of its message)."""
    text = str(error)
    if isinstance(error, KeyError | AttributeError):
        text = text.replace("\\n", "\n").replace("\\'", "'").strip("'\"")
        lines = [s.strip().strip("'\"") for s in text.splitlines() if s.strip()]
        if lines:
            hint = f" ({lines[-1]})" if len(lines) > 1 else ""
            return f"unknown config field {lines[0]!r}{hint}"
    lines = [s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith("Pass --help")]
    return lines[-1] if lines else type(error).__name__


_PROG = {"name": ""}


def fail(message: str, status: int = 1, prog: str | None = None) -> None:
    """Ends the command with `<prog>: error: <message on one line>` on stderr; `prog` defaults to the one
    `run` was given, else the script's name."""
    prog = prog or _PROG["name"] or os.path.basename(sys.argv[0])
    message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def with_checkpoint_config(argv: list[str], flag_values=FLAGS) -> list[str]:
    """`argv` (flag files expanded), plus `--config=configs/checkpoint.py:<step folder>` and
    `--checkpoint=<step folder>` when it has `--config.*` overrides, no `--config` and a `--checkpoint`
    (see the module docstring); unchanged for commands without both flags."""
    if "config" not in flag_values or "checkpoint" not in flag_values:
        return argv
    argv = flag_values.read_flags_from_files(argv, force_gnu=False)
    end = argv.index("--") if "--" in argv else len(argv)
    flag_args = argv[1:end]
    if any(re.match(r"^--?config(=|$)", a) for a in flag_args):
        return argv
    if not any(re.match(r"^--?(no)?config\.", a) for a in flag_args):
        return argv
    probe = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "", flag_values=probe)
    probe(argv, known_only=True)
    if not probe.checkpoint:
        raise InputError("--config.* overrides change the config of --checkpoint (or of --config): give one")
    directory, step = checkpoint.resolve(probe.checkpoint)
    folder = f"{directory}/{step}"
    config_file = importlib.util.find_spec("configs.checkpoint").origin
    # The pinned --checkpoint comes after the user's (the last value wins), before any "--".
    return [argv[0], f"--config={config_file}:{folder}", *argv[1:end], f"--checkpoint={folder}", *argv[end:]]


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        argv = with_checkpoint_config(argv)
        rest = FLAGS(argv)
        if "config" in FLAGS and FLAGS["config"].present:
            FLAGS["config"].value.keys()  # loads the file now, so its errors are parse errors
    except Exception as e:  # noqa: BLE001  (any parse failure is the user's: report it in one line)
        fail(one_line(e), status=2)
    if len(rest) > 1:
        fail(f"unexpected arguments {rest[1:]}; every input is a --flag", status=2)
    return rest


class _StdoutHandler(logging.StreamHandler):
    """Writes each record to `sys.stdout` as it is then: a stream bound at setup would outlive a
    replaced stdout (a test's capture, a notebook's), and writing to it once closed fails."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        del value


def setup_logging() -> None:
    """INFO logs of this package on stdout, with time stamps; absl's own handler left quiet. Calling it
    again (several entry points in one process) keeps one handler."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s] %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    ours = (absl_logging.ABSLHandler, _StdoutHandler)
    root.handlers = [h for h in root.handlers if not isinstance(h, ours)] + [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("genmask_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only and partial-restore notices


def run(main: Callable[[], None], prog: str = "") -> None:
    """`app.run` with one-line reporting of bad input; `main` takes no arguments (flags are parsed).

    prog: the name in error lines, e.g. "genmask_jax.train" (default: the script's file name).
    """
    _PROG["name"] = prog

    def wrapped(argv):
        del argv
        setup_logging()
        if host.cpu_only():  # before jax starts its backends (and their threads)
            host.reuse_freed_memory()
        report_user_errors(main)

    app.run(wrapped, flags_parser=_parse_flags)


def report_user_errors(main: Callable[[], None]) -> None:
    """Runs `main`; a user error it raises (USER_ERRORS) ends the command with one line, exit status 1."""
    try:
        main()
    except USER_ERRORS as e:  # grain's reader threads re-raise an example's error as it was raised
        fail(str(e) if not isinstance(e, OSError) or not e.filename else _os_error(e))


def _os_error(error: OSError) -> str:
    return f"{error.strerror or type(error).__name__}: {error.filename}"


def checkpoint_and_config(path: str, config: ml_collections.ConfigDict | None):
    """(manager directory, step, config) of `--checkpoint`, resolved once (a live training run may save
    a newer step meanwhile; load `directory / str(step)`), with the config to use (`--config`, else the
    one saved with that step), after starting JAX's distributed runtime from its `distributed` section
    as training does (it must come before anything starts JAX's backends). Under a multi-process launch
    the processes must have resolved the same step (`check_same_step`)."""
    directory, step = checkpoint.resolve(path)
    config = config if config is not None else checkpoint.saved_config(directory, step)
    if multihost.maybe_initialize(config.get("distributed")):
        check_same_step(directory, step)
    return directory, step, config


def check_same_step(directory, step: int) -> None:
    """Raises InputError when the processes resolved `--checkpoint` to different steps: each resolves
    it on its own, before the distributed runtime that could share one answer exists (its settings are
    in the config saved with the step), so a training run saving meanwhile can split them."""
    steps = [int(s) for s in multihost.gather_ints(step)]
    if len(set(steps)) > 1:
        raise InputError(
            f"the processes resolved --checkpoint to different steps ({steps} by process; a training run "
            f"saved meanwhile): pass one step folder, e.g. --checkpoint={directory}/{max(steps)}"
        )


def check_on_writer(check: Callable[[str], None], paths: Sequence[str]) -> None:
    """Runs `check` (which raises InputError) on each output path on process 0, the one that writes the
    outputs, and stops every process when it fails there: other hosts may not see process 0's disks, and
    one process leaving alone would leave the others waiting in a collective. Call after
    `checkpoint_and_config`."""
    others = lambda: InputError("process 0 cannot write the outputs (its error says why)")  # noqa: E731
    multihost.on_process_0(lambda: [check(path) for path in paths], others)


def check_image_size(config: ml_collections.ConfigDict, size: tuple[int, int] | None = None) -> None:
    """Raises InputError, before the checkpoint loads, for an image size the model of `config` cannot
    take: `size` (generate's --size) or else `config.data.resolution` (what images are fitted to)."""
    from genmask_jax.infer.generator import check_image_hw
    from genmask_jax.models.build import build_model

    model = build_model(config)  # its own errors are the config's, not the size's
    try:
        check_image_hw(model, size if size is not None else config.data.resolution)
    except ValueError as e:
        raise InputError(f"{'--size' if size is not None else 'config.data.resolution'}: {e}") from e


def require(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)

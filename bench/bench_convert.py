"""Host memory and wall time of converting a full-size WAN DiT checkpoint (random weights).

    python -m bench.bench_convert [--variant 1.3b] [--layout original|original-pth|diffusers]
        [--dtype float32] [--scan-layers] [--run] [--workdir DIR] [--json FILE]

Writes a random checkpoint of the variant's shapes: one `.safetensors` file (a torch `.pth` for
original-pth) with the original Wan-AI names, or a diffusers `transformer/` folder in 2 GiB shards.
Then runs `python -m convert.wan_dit` on it in a child process, `convert.wan_dit.load` on the result
in another, and that load followed by `export_diffusers` (back to a diffusers folder) in a third;
reads each child's /proc/PID/status every 10 ms:
- RssAnon, memory the child allocated (the params, plus the interpreter, jax and orbax);
- RssFile, pages of memory-mapped files (the source tensors as they are read, and shared libraries).
  The kernel can drop them under pressure, so they are not memory the conversion needs.
`--run` also writes a training run's checkpoint of the variant (the paper's config with this DiT: random
params and an EMA copy, fp32) and measures `python -m convert.export` on it, which reads one of the two
(the EMA) as host arrays and writes the DiT as a diffusers folder (the run has no converted VAE to write).
Each peak is printed beside the size of the weights. The same is run on the tiny variant, whose
anonymous peak is the cost of the imports alone. Run by hand; nothing here is asserted.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from convert import checkpoint_io as io
from convert import wan_dit
from genmask_jax.models.dit import DiTConfig

GiB = 2**30
REPO = Path(__file__).resolve().parents[1]  # the children import convert/ from here


def write_checkpoint(config: DiTConfig, layout: str, dtype: str, dst: Path) -> tuple[Path, int]:
    """A random checkpoint of `config`'s shapes in `layout`; returns (its path, bytes of weights)."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for path, shape in wan_dit.expected_shapes(config).items():
        value = (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype)
        key = wan_dit.diffusers_key(path)
        tensors[key if layout == "diffusers" else wan_dit.original_key(key)] = wan_dit.from_flax(path, value)
    size = sum(t.nbytes for t in tensors.values())
    if layout == "diffusers":
        return io.write_safetensors_folder(dst, tensors, wan_dit.diffusers_config(config),
                                           wan_dit.WEIGHTS_NAME), size
    dst.mkdir(parents=True)
    if layout == "original-pth":
        import torch

        as_torch = lambda a: (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)  # noqa: E731
                              if a.dtype.name == "bfloat16" else torch.from_numpy(a))
        torch.save({k: as_torch(v) for k, v in tensors.items()}, dst / "model.pth")
        return dst / "model.pth", size
    save_file(tensors, str(dst / "model.safetensors"))
    return dst / "model.safetensors", size


def _status_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) for k in ("RssAnon", "RssFile", "VmHWM")}


def child_peaks(cmd: list[str]) -> dict[str, float]:
    """Runs `cmd`; its wall seconds, peak RssAnon / RssFile and VmHWM in GiB, and its last output line."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    peak = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}

    def sample():
        while child.poll() is None:
            try:
                now = _status_kib(child.pid)
            except (OSError, ValueError, KeyError):  # the child is exiting
                break
            for k, v in now.items():
                peak[k] = max(peak[k], v)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = child.communicate()
    sampler.join()
    seconds = time.perf_counter() - start
    if child.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err}")
    return {"seconds": seconds, "anon_gib": peak["RssAnon"] / 2**20, "file_gib": peak["RssFile"] / 2**20,
            "hwm_gib": peak["VmHWM"] / 2**20, "said": (out.strip().splitlines() or [""])[-1]}


def convert_load_export(src: Path, dst: Path, num_heads: int, scan_layers: bool) -> dict[str, dict]:
    """Peaks of the converter CLI writing `dst`; of `convert.wan_dit.load(dst)` in a new process; and of
    loading it and exporting it back to a diffusers folder in a third."""
    cmd = [sys.executable, "-m", "convert.wan_dit", str(src), str(dst), "--overwrite",
           "--num-heads", str(num_heads)] + (["--scan-layers"] if scan_layers else [])
    load = ("import sys, jax; from convert import wan_dit; c, p = wan_dit.load(sys.argv[1]); "
            "print(type(jax.tree.leaves(p)[0]).__name__)")
    export = ("import sys; from convert import wan_dit; c, p = wan_dit.load(sys.argv[1]); "
              "print(wan_dit.export_diffusers(p, c, sys.argv[2]))")
    return {"convert": child_peaks(cmd), "load": child_peaks([sys.executable, "-c", load, str(dst)]),
            "load+export": child_peaks([sys.executable, "-c", export, str(dst), str(dst) + "-exported"])}


# Run in a child, so that the bench process stays small: a paper-config run of DiT variant argv[1]
# (scanned when argv[2] == "1") with random fp32 params and an EMA copy, saved as training saves it.
_WRITE_RUN = """
import sys
import flax.linen as nn
import jax
import numpy as np
from configs.genmask import get_config
from genmask_jax.models import build
from genmask_jax.models.dit import DiTConfig
from genmask_jax.train.checkpointing import Checkpointer

variant, scan, dst = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
config = get_config("variant=paper")
config.model.dit = DiTConfig.from_variant(variant, scan_layers=scan).to_dict()
abstract = jax.eval_shape(build.dit_initializer(build.build_model(config)), jax.random.key(0))
rng = np.random.default_rng(0)
params = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32) * 0.02, nn.unbox(abstract))
checkpointer = Checkpointer(dst, async_save=False)
checkpointer.save(100, {"params": params, "ema_params": params}, config=config)
checkpointer.close()
print(sum(x.nbytes for x in jax.tree.leaves(params)))
"""


def export_run(variant: str, root: Path, scan_layers: bool) -> dict:
    """Peak of `python -m convert.export` on a run checkpoint of DiT `variant` (written first)."""
    run = root / f"{variant}-run"
    subprocess.run([sys.executable, "-c", _WRITE_RUN, variant, str(int(scan_layers)), str(run)],
                   check=True, cwd=REPO, capture_output=True)
    try:
        exported = root / f"{variant}-run-exported"
        return child_peaks([sys.executable, "-m", "convert.export", str(run), str(exported)])
    finally:
        shutil.rmtree(run)
        shutil.rmtree(root / f"{variant}-run-exported", ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--variant", default="1.3b")
    parser.add_argument("--layout", default="original", choices=("original", "original-pth", "diffusers"))
    parser.add_argument("--dtype", default="float32", help="dtype of the written source tensors")
    parser.add_argument("--scan-layers", action="store_true")
    parser.add_argument("--run", action="store_true", help="also export a training run (convert.export)")
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert-"))
    results = {}
    try:
        for variant in dict.fromkeys(("tiny", args.variant)):
            config = DiTConfig.from_variant(variant)
            src, size = write_checkpoint(config, args.layout, args.dtype, root / f"{variant}-src")
            runs = convert_load_export(src, root / f"{variant}-dst", config.num_heads, args.scan_layers)
            if args.run:
                runs["run export"] = export_run(variant, root, args.scan_layers)
            results[variant] = {"weights_gib": size / GiB, **runs}
            for what, r in runs.items():
                print(f"{variant} {what}: weights {size / GiB:.2f} GiB ({args.dtype}, {args.layout}), "
                      f"{r['seconds']:.1f} s; peak RssAnon {r['anon_gib']:.2f} GiB, RssFile "
                      f"{r['file_gib']:.2f} GiB, VmHWM {r['hwm_gib']:.2f} GiB ({r['said']})", flush=True)
            shutil.rmtree(root / f"{variant}-src")
            shutil.rmtree(root / f"{variant}-dst")
            shutil.rmtree(root / f"{variant}-dst-exported")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cpus": os.cpu_count(), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()

"""Finding 1: mask latents of the (toy) WAN VAE are linearly separable, and stay so under heavy noise.

On held-out scenes: (a) the first principal component of mask-latent pixels against the mask
downsampled to the latent grid (8x8 pixel blocks, foreground if more than half covered); (b) a
logistic-regression classifier on single latent pixels (16 channels) of the noised latent
`x_t = (1 - t) x0 + t eps`, for increasing t, predicting the downsampled label: for mask latents
(target vs background) and, for comparison, for image latents (any shape vs background).

    python -m genmask_jax.experiments.latent_separability --out docs/findings
"""

import argparse
import json
import os

import numpy as np

from configs import demo as demo_config
from genmask_jax.eval.inprocess import all_shapes_mask
from genmask_jax.models import mask_codec
from genmask_jax.train import vae_pretrain
from genmask_jax.train.latent_data import _encode_all, make_encode_fn, shapes_source

NOISE_LEVELS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)


def block_labels(masks: np.ndarray, factor: int) -> np.ndarray:
    """bool `(N, H, W)` -> `(N, H/f, W/f)`: blocks more than half foreground."""
    n, h, w = masks.shape
    return masks.reshape(n, h // factor, factor, w // factor, factor).mean(axis=(2, 4)) > 0.5


def fit_logistic(x: np.ndarray, y: np.ndarray, iterations: int = 25, l2: float = 1e-3) -> np.ndarray:
    """Class-balanced logistic regression by Newton's method (IRLS); x `(N, D)`, y `(N,)` bool ->
    weights `(D + 1,)`. Balanced because foreground blocks are rare."""
    a = np.concatenate([x, np.ones((len(x), 1))], axis=1).astype(np.float64)
    sample = np.where(y, 0.5 / max(np.mean(y), 1e-6), 0.5 / max(1 - np.mean(y), 1e-6))
    w = np.zeros(a.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -30, 30)))
        grad = a.T @ (sample * (p - y)) + l2 * w
        hessian = (a * (sample * p * (1 - p))[:, None]).T @ a + l2 * np.eye(len(w))
        w -= np.linalg.solve(hessian, grad)
    return w


def balanced_accuracy(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    pred = np.concatenate([x, np.ones((len(x), 1))], axis=1) @ w > 0
    return float(0.5 * (np.mean(pred[y]) + np.mean(~pred[~y])))


def pca_agreement(latents: np.ndarray, labels: np.ndarray) -> dict:
    """|correlation| of the first principal component with the label, and the balanced accuracy of
    thresholding it at its best split."""
    x = latents - latents.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[0]
    corr = abs(float(np.corrcoef(proj, labels.astype(np.float64))[0, 1]))
    best = 0.0
    for thr in np.quantile(proj, np.linspace(0.02, 0.98, 97)):
        for sign in (1, -1):
            pred = sign * (proj - thr) > 0
            best = max(best, 0.5 * (np.mean(pred[labels]) + np.mean(~pred[~labels])))
    return {"abs_correlation": corr, "best_threshold_balanced_accuracy": float(best)}


def run(vae_path: str, num_scenes: int = 512, seed: int = 0) -> dict:
    vae_config, vae_params = vae_pretrain.load(vae_path)
    data = demo_config.get_config().data
    source = shapes_source(data, "test", num_scenes)
    factor = vae_config.spatial_factor
    examples = [source[i] for i in range(num_scenes)]
    images = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0
    masks = np.stack([e["mask"] > 0 for e in examples])
    shapes = np.stack([all_shapes_mask(source.scene(i), *masks.shape[1:]) for i in range(num_scenes)])
    encode = make_encode_fn(vae_config)
    mask_latents = _encode_all(encode, vae_params, np.asarray(mask_codec.mask_to_rgb(masks)), 64)
    image_latents = _encode_all(encode, vae_params, images, 64)
    z = vae_config.z_dim
    cases = {
        "mask latent -> target": (mask_latents.reshape(-1, z), block_labels(masks, factor).reshape(-1)),
        "image latent -> any shape": (image_latents.reshape(-1, z), block_labels(shapes, factor).reshape(-1)),
    }
    rng = np.random.default_rng(seed)
    half = num_scenes // 2 * (masks.shape[1] // factor) * (masks.shape[2] // factor)
    out = {"pca": {}, "linear_probe": {}, "noise_levels": list(NOISE_LEVELS), "num_scenes": num_scenes}
    for name, (x0, y) in cases.items():
        out["pca"][name] = pca_agreement(x0, y)
        accs = []
        for t in NOISE_LEVELS:
            xt = (1 - t) * x0 + t * rng.standard_normal(x0.shape).astype(np.float32)
            w = fit_logistic(xt[:half], y[:half])
            accs.append(balanced_accuracy(xt[half:], y[half:], w))
        out["linear_probe"][name] = accs
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, accs in result["linear_probe"].items():
        ax.plot(result["noise_levels"], accs, marker="o", label=name)
    ax.set_xlabel("noise level t  (x_t = (1-t) x0 + t eps)")
    ax.set_ylabel("held-out balanced accuracy")
    ax.set_title("linear probe on single latent pixels")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", default=demo_config.TOY_VAE)
    parser.add_argument("--num_scenes", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/findings")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    result = run(args.vae, args.num_scenes, args.seed)
    with open(os.path.join(args.out, "latent_separability.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(args.out, "latent_separability.png"))
    print(json.dumps({k: result[k] for k in ("pca", "linear_probe")}, indent=1))


if __name__ == "__main__":
    main()

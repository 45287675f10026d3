"""Inference with trained checkpoints.

- `checkpoint.load(path, config=None) -> LoadedModel`: a workdir, checkpoints folder or step folder ->
  model, DiT parameters (EMA if kept) and the frozen VAE on this process's devices.
- `segmenter.Segmenter(loaded, num_steps=1, rewrite=None, batch_size=8)`: `(images, prompts) -> masks` at
  each image's original size (PIL images or uint8 RGB, RGBA or grey arrays; `rewrite`: two-stage
  reasoning, default the config's; `batch_size` images per device call), and `predict(batch)` for
  model-resolution evaluation batches.
- `generator.Generator(loaded)`: `(prompts, num_steps, guidance_scale, seed) -> uint8 images`.
- `cli`: what the command-line entry points share (config flag, one-line errors); `images`: file I/O.
"""

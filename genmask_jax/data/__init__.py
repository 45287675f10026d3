"""Data: sources, preprocessing and the grain pipelines.

Entry points: `pipeline.default_data_config()`, `pipeline.make_train_iterator(...)`,
`pipeline.make_eval_iterator(...)`, `preprocess.unfit_mask(...)`; sources in `shapes`, `reasonseg`,
`refcoco` (TFDS builder, `python -m genmask_jax.data.prepare refcoco ...`), `captions`.
"""

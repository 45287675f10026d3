"""Qwen2.5-VL instruction encoder on a tiny random model and a word-level tokenizer built here offline."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from genmask_jax.encoders.qwen2_5_vl import Qwen25VLEncoder  # noqa: E402

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
WORDS = (
    "the a an of on red blue green yellow circle square triangle star shape left right above below what is "
    "in this image please output segmentation mask user assistant answer with short referring expression "
    "few words that names object request about background small large"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab = {w: i for i, w in enumerate(SPECIAL + ["[UNK]"] + WORDS + [".", "?", ","])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            fullatt_block_indexes=[1],
            window_size=56,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("tiny_qwen")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=56 * 56 * 4).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def encoder(tiny_qwen):
    return Qwen25VLEncoder(
        tiny_qwen, context_length=40, dtype="float32", device="cpu", rewrite_max_new_tokens=6
    )


def _image(seed, h=60, w=70):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_encode_shapes_text_only_and_padding(encoder):
    context, mask = encoder.encode([_image(0), None], ["the red circle", "a blue square on a background"])
    assert context.shape == (2, 40, 64) and context.dtype == np.float32 and mask.dtype == np.bool_
    assert mask[0].sum() > mask[1].sum()  # the image adds its tokens
    assert np.all(context[~mask] == 0) and np.isfinite(context).all()


def test_mm_token_type_ids_marks_image_tokens_and_is_used(encoder):
    inputs = encoder.model_inputs([_image(1)], ["the star"], generation_prompt=False)
    n_image = int(inputs["mm_token_type_ids"].sum())
    grid = inputs["image_grid_thw"][0]
    assert n_image == int(grid.prod()) // encoder.merge_size**2 > 0
    with torch.no_grad():
        with_types = encoder.model.model(**inputs).last_hidden_state
        encoder.model.model.rope_deltas = None
        without = encoder.model.model(
            **{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
        ).last_hidden_state
    assert not torch.allclose(with_types, without, atol=1e-4)  # M-RoPE positions differ from 1D ones


def test_batched_equals_single_and_truncation_warns(encoder, tiny_qwen, caplog):
    images, texts = (
        [_image(2), _image(3, 40, 90), None],
        ["the left star", "a small square", "the blue circle"],
    )
    batched, batched_mask = encoder.encode(images, texts)
    for i in range(3):
        single, single_mask = encoder.encode([images[i]], [texts[i]])
        np.testing.assert_array_equal(single_mask[0], batched_mask[i])
        # right padding never reaches earlier tokens under causal attention; float32 reassociation only
        np.testing.assert_allclose(single[0], batched[i], atol=1e-4)
    short = Qwen25VLEncoder(tiny_qwen, context_length=5, dtype="float32", device="cpu")
    _, mask = short.encode([_image(2)], ["the left star"])
    assert mask.all() and "truncated" in caplog.text


def test_two_stage_rewrite(encoder):
    _, mask = encoder.encode(
        [_image(4), _image(5)], ["what is the object that is round?", "the square"], rewrite=[True, False]
    )
    assert isinstance(encoder.last_rewrites[0], str) and encoder.last_rewrites[1] is None
    assert len(encoder.tokenizer(encoder.last_rewrites[0]).input_ids) <= 6 + 2
    assert mask.shape == (2, 40)


def test_cache_from_qwen_equals_direct(encoder, tmp_path):
    from genmask_jax.data.pipeline import default_data_config
    from genmask_jax.data.sources import make_task_source
    from genmask_jax.encoders.cache import EmbeddingCache
    from genmask_jax.encoders.precompute import precompute

    c = default_data_config()
    c.resolution = (32, 32)
    c.shapes.val_size, c.shapes.train_size = 3, 2
    precompute(c, str(tmp_path), ["val", "train"], batch_size=2, dtype="float32", encoder=encoder)
    cache = EmbeddingCache(str(tmp_path))
    source = make_task_source("shapes", "val", c, "seg")
    for i in range(3):
        raw = source[i]
        direct, direct_mask = encoder.encode([raw["image"]], [raw["text"]])
        context, mask = cache.lookup(raw["id"])
        np.testing.assert_array_equal(mask, direct_mask[0])
        np.testing.assert_allclose(context, direct[0], atol=1e-4)  # batch of 2 vs 1: reassociation only
    gen = make_task_source("shapes", "train", c, "gen")[0]
    direct, direct_mask = encoder.encode([None], [gen["text"]])  # captions are encoded without the image
    context, mask = cache.lookup(gen["id"])
    np.testing.assert_array_equal(mask, direct_mask[0])
    np.testing.assert_allclose(context, direct[0], atol=1e-4)


def test_precompute_rewrites_reasoning_queries_and_records_them(encoder, tmp_path):
    import json

    from PIL import Image

    from genmask_jax.data.pipeline import default_data_config
    from genmask_jax.encoders.cache import EmbeddingCache
    from genmask_jax.encoders.precompute import precompute

    folder = tmp_path / "rs" / "val"
    folder.mkdir(parents=True)
    shape = [{"label": "target", "points": [[2, 2], [20, 2], [20, 20], [2, 20]]}]
    for stem, text, long in (("a", "what would you sit on here?", True), ("b", "the square", False)):
        Image.fromarray(_image(7, 40, 40)).save(folder / f"{stem}.jpg")
        (folder / f"{stem}.json").write_text(
            json.dumps({"text": [text], "is_sentence": long, "shapes": shape})
        )
    c = default_data_config()
    c.seg_sources, c.gen_sources, c.reasonseg.root = "reasonseg", "", str(tmp_path / "rs")
    c.encoder.rewrite_reasoning = True
    precompute(c, str(tmp_path / "cache"), ["val"], batch_size=2, dtype="float32", encoder=encoder)
    cache = EmbeddingCache(str(tmp_path / "cache"))
    header_a, _ = cache.record("reasonseg-val-a-0")
    header_b, _ = cache.record("reasonseg-val-b-0")
    assert isinstance(header_a["rewrite"], str) and header_b["rewrite"] is None
    assert header_a["text"].startswith("what would you sit on here?")


def test_context_shape_reads_the_model_config(tiny_qwen):
    from genmask_jax.data.pipeline import context_shape, default_data_config

    c = default_data_config()
    c.encoder.name, c.encoder.model_path, c.encoder.context_length = "qwen2_5_vl", tiny_qwen, 77
    assert context_shape(c) == (77, 64)

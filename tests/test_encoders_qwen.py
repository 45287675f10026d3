"""Qwen2.5-VL instruction encoder on a tiny random model and a word-level tokenizer built here offline."""

import gc
import json
import shutil
import weakref

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from genmask_jax.data.pipeline import default_data_config, make_eval_iterator  # noqa: E402
from genmask_jax.encoders import ContextError, PromptTooLong, fingerprint, make_encoder  # noqa: E402
from genmask_jax.encoders.cache import CacheMismatch, CacheWriter, EmbeddingCache, SkippedExample  # noqa: E402
from genmask_jax.encoders.precompute import PrecomputeError, precompute  # noqa: E402
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


def qwen_config(tiny_qwen, **encoder_fields):
    """A data config whose `encoder` is the `encoder` fixture's settings (max_pixels 0: the tiny
    processor's own 56*56*4, at most 16 image tokens)."""
    c = default_data_config()
    c.resolution, c.num_threads = (32, 32), 1
    fields = dict(
        name="qwen2_5_vl",
        model_path=tiny_qwen,
        context_length=40,
        dtype="float32",
        rewrite_max_new_tokens=6,
        max_pixels=0,
    )
    c.encoder.update({**fields, **encoder_fields})
    return c


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


def test_batched_equals_single(encoder):
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


def test_a_prompt_longer_than_the_context_is_refused_not_cut(tiny_qwen, tmp_path):
    # 16 image tokens (112 x 112) + 8 template and instruction tokens: the instruction comes last and
    # would be what a cut at 22 drops.
    short = Qwen25VLEncoder(tiny_qwen, context_length=22, dtype="float32", device="cpu")
    _, mask = short.encode([None], ["the left star"])
    assert mask.sum() == 6
    message = r"24 tokens \(16 image tokens.*context_length=22.*'the left star'"
    with pytest.raises(PromptTooLong, match=message) as e:
        short.encode([None, _image(2, 112, 112)], ["the left star", "the left star"])
    assert e.value.index == 1
    c = qwen_config(tiny_qwen, context_length=22)
    c.gen_sources, c.shapes.val_size, c.resolution = "", 2, (112, 112)
    with pytest.raises(PromptTooLong, match="example 'shapes-0-val-0'"):
        precompute(c, str(tmp_path), ["val"], batch_size=2, dtype="float32", encoder=short)


def test_a_long_text_only_prompt_is_cut_keeping_the_template_end(encoder, tiny_qwen, tmp_path, caplog):
    """One caption longer than context_length stopped the whole precompute (and an uncached training
    run); a caption has no instruction after it to lose, so it is cut, as the toy encoder cuts."""
    words = ("a small red circle on the left " * 8).split()  # 56 words: a prompt of 2 + 56 + 1 tokens
    with caplog.at_level("WARNING", logger="genmask_jax.encoders.base"):
        context, mask = encoder.encode([None, None], [" ".join(words), "the red circle"])
    assert mask.sum(1).tolist() == [40, 6]
    assert "59 tokens truncated to context_length=40" in caplog.text
    ids = encoder.model_inputs([None], [" ".join(words)], False, max_length=40)["input_ids"][0].tolist()
    assert ids[-1] == encoder.tokenizer.convert_tokens_to_ids("<|im_end|>")  # the template's end stays
    cut, cut_mask = encoder.encode([None], [" ".join(words[:37])])  # the same 40 tokens, uncut
    np.testing.assert_array_equal(cut_mask[0], mask[0])
    np.testing.assert_allclose(cut[0], context[0], atol=1e-4)
    with pytest.raises(PromptTooLong, match=r"16 image tokens.*raise context_length or lower .*max_pixels"):
        encoder.encode([_image(2, 112, 112)], [" ".join(words)])  # the instruction would be cut
    for i in range(2):
        Image.fromarray(_image(i)).save(tmp_path / f"im{i}.jpg")
    captions = [("im0.jpg", " ".join(words)), ("im1.jpg", "a blue star")]
    lines = [json.dumps({"image": image, "caption": text}) + "\n" for image, text in captions]
    (tmp_path / "caps.jsonl").write_text("".join(lines))
    c = qwen_config(tiny_qwen)
    c.seg_sources, c.gen_sources, c.captions.path = "", "captions", str(tmp_path / "caps.jsonl")
    precompute(c, str(tmp_path / "cache"), ["train"], batch_size=1, dtype="float32", encoder=encoder)
    assert len(EmbeddingCache(str(tmp_path / "cache"))) == 2


def test_a_text_only_prompt_that_cannot_be_cut_is_refused_without_max_pixels(encoder, monkeypatch):
    monkeypatch.setattr(encoder, "context_length", 3)  # room for the template alone
    with pytest.raises(PromptTooLong, match=r"6 tokens \(0 image.*=3; raise context_length;") as refused:
        encoder.encode([None], ["the red circle"])
    assert "max_pixels" not in str(refused.value)


def test_non_finite_contexts_are_refused(tiny_qwen):
    """float16 overflows in Qwen2.5's activations; the NaNs went on into the cache and the DiT."""
    half = Qwen25VLEncoder(tiny_qwen, context_length=40, dtype="float16", device="cpu")
    mlp = half.model.model.language_model.layers[0].mlp
    with torch.no_grad():  # activations past float16's 65504, as the 7B model's reach
        mlp.down_proj.weight.fill_(6e4)
        mlp.up_proj.weight.fill_(30.0)
    with pytest.raises(ContextError, match=r"float16 \(data.encoder.dtype\).*circle'.*bfloat16 or float32"):
        half.encode([None], ["the red circle"])


def test_max_pixels_from_the_config_bounds_the_image_tokens(tiny_qwen):
    inputs = make_encoder(qwen_config(tiny_qwen, max_pixels=56 * 56).encoder).model_inputs(
        [_image(1, 112, 112)], ["the star"], generation_prompt=False
    )
    assert int(inputs["mm_token_type_ids"].sum()) == 4  # resized to 56 x 56, not the processor's 112 x 112
    with pytest.raises(ValueError, match="up to 64 tokens, all of context_length=40"):
        make_encoder(qwen_config(tiny_qwen, max_pixels=224 * 224).encoder)


def test_the_instruction_survives_the_paper_setting(tiny_qwen, tmp_path):
    """Qwen2.5-VL's own preprocessor_config (max_pixels 12845056) gives a 640x640 image 529 tokens:
    with context_length 512 the instruction used to be cut off and every instruction gave one context."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = shutil.copytree(tiny_qwen, tmp_path / "qwen")
    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056).save_pretrained(path)
    c = default_data_config()
    c.encoder.update(dict(name="qwen2_5_vl", model_path=str(path), context_length=512, dtype="float32"))
    encoder = make_encoder(c.encoder)  # the default data.encoder.max_pixels
    image = _image(0, 640, 640)
    context, mask = encoder.encode([image, image], ["the red circle on the left", "the blue square above"])
    assert mask.sum(1).max() < 512
    assert not np.allclose(context[0], context[1], atol=1e-3)


def test_a_config_saved_before_max_pixels_uses_its_default(tiny_qwen, tmp_path):
    """A `data.encoder` without `max_pixels` (saved before the field existed) reads the default, in the
    encoder and in the cache fingerprint alike: it fell back to the processor's 12.8 MP, which the
    encoder refuses at context 512, and its fingerprint said 0 where a cache written today says 448^2."""
    import ml_collections
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from genmask_jax.encoders import DEFAULT_MAX_PIXELS, fingerprint

    path = shutil.copytree(tiny_qwen, tmp_path / "qwen")
    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056).save_pretrained(path)  # the 7B's value
    c = default_data_config()
    c.encoder.update(dict(name="qwen2_5_vl", model_path=str(path), context_length=512, dtype="float32"))
    old = c.encoder.to_dict()
    del old["max_pixels"]
    old = ml_collections.ConfigDict(old)
    assert fingerprint(old) == fingerprint(c.encoder)
    assert fingerprint(old)["max_pixels"] == DEFAULT_MAX_PIXELS
    encoder = make_encoder(old)
    assert encoder.image_processor.size["longest_edge"] == DEFAULT_MAX_PIXELS
    with pytest.raises(ValueError, match="max_pixels=12845056 .*max_pixels 0: the model's preprocessor"):
        make_encoder(type(old)(dict(old.to_dict(), max_pixels=0)))  # the documented refusal of 0


def test_a_thin_image_is_read_channels_last(encoder):
    """The image processor guessed the channel axis: an (H, W, 3) image with H = 1 or 3 was read as
    (C, H, W), a 150 x 3 strip for a 1 x 150 one, and the VLM saw a transposed image."""
    for height in (1, 3):
        image = np.zeros((height, 150, 3), np.uint8)
        inputs = encoder.model_inputs([image], ["the star"], generation_prompt=False)
        _, grid_height, grid_width = inputs["image_grid_thw"][0].tolist()
        assert grid_height < grid_width, height


class _BannerSource:
    """Segmentation examples; example 2 is a 2 x 500 banner, which Qwen's image processor refuses
    (a ValueError: aspect ratio over 200)."""

    shapes = ((60, 70), (40, 50), (2, 500), (60, 70))

    def __len__(self):
        return len(self.shapes)

    def example_id(self, i):
        return f"banner-{i}"

    def __getitem__(self, i):
        image = _image(i, *self.shapes[i])
        return {"id": self.example_id(i), "image": image, "mask": image[..., 0] > 0, "text": "the red circle"}


def test_precompute_skips_an_image_the_processor_refuses(encoder, tiny_qwen, tmp_path, monkeypatch):
    """One such image stopped the whole precompute with a traceback, and every resume at the same
    example, where the pipelines running the encoder skip it: it is now skipped and recorded."""
    from genmask_jax.encoders import precompute as module

    monkeypatch.setattr(module, "make_task_source", lambda *args: _BannerSource())
    c = qwen_config(tiny_qwen)
    c.gen_sources = ""
    result = precompute(c, str(tmp_path), ["train"], batch_size=2, dtype="float32", encoder=encoder)
    assert result["written"] == 3 and "1 examples skipped (ValueError: 1)" in result["skips"]
    cache = EmbeddingCache(str(tmp_path), fingerprint(c.encoder))
    with pytest.raises(SkippedExample, match="aspect ratio"):
        cache.lookup("banner-2", "the red circle")
    for i in (0, 1, 3):  # the batch with the banner was encoded one example at a time
        raw = _BannerSource()[i]
        direct, direct_mask = encoder.encode([raw["image"]], [raw["text"]])
        context, mask = cache.lookup(raw["id"], raw["text"])
        np.testing.assert_array_equal(mask, direct_mask[0])
        np.testing.assert_allclose(context, direct[0], atol=1e-4)
    again = precompute(c, str(tmp_path), ["train"], batch_size=2, dtype="float32", encoder=encoder)
    assert (again["written"], again["already"]) == (0, 4)


def test_the_fingerprint_holds_the_prompt_files_and_the_processor_pixel_bounds(tiny_qwen, tmp_path):
    """The fingerprint left out the tokenizer, the chat template (its system prompt) and the image
    processor's settings, and said 0 for `max_pixels` 0 (the processor's own), with no `min_pixels`: a
    folder of the same name with another system prompt or pixel bounds resumed a cache written with the
    first, mixing two kinds of contexts."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    name = "Qwen2.5-VL-7B-Instruct"
    base = shutil.copytree(tiny_qwen, tmp_path / "base" / name)

    def fields(path, max_pixels=0):
        return fingerprint(qwen_config(str(path), max_pixels=max_pixels).encoder)

    def changed(path, max_pixels=0):  # the fields in which `path` differs from `base`
        a, b = fields(base, max_pixels), fields(path, max_pixels)
        return sorted(k for k in a if a[k] != b[k])

    for max_pixels in (0, 56 * 56):  # the bounds the encoder's image processor resizes into
        size = make_encoder(qwen_config(str(base), max_pixels=max_pixels).encoder).image_processor.size
        got = fields(base, max_pixels)
        assert (got["min_pixels"], got["max_pixels"]) == (size["shortest_edge"], size["longest_edge"])
    assert fields(base)["max_pixels"] == 56 * 56 * 4  # the tiny processor's own, not 0

    def copy(label, edit=None):
        path = shutil.copytree(base, tmp_path / label / name)
        if edit is not None:
            edit(path)
        return path

    assert changed(copy("copy")) == []
    system = lambda p: (p / "chat_template.jinja").write_text("system prompt\n" + CHAT_TEMPLATE)
    assert changed(copy("system", system)) == ["prompt_files_digest"]
    for file_name in ("tokenizer.json", "tokenizer_config.json"):
        edited = copy(file_name)
        (edited / file_name).write_text((edited / file_name).read_text() + "\n")
        assert changed(edited) == ["prompt_files_digest"], file_name

    def processor(**bounds):
        return lambda p: Qwen2VLImageProcessorPil(**bounds).save_pretrained(p)

    smaller_min = copy("min", processor(min_pixels=28 * 28, max_pixels=56 * 56 * 4))
    assert changed(smaller_min) == ["min_pixels", "prompt_files_digest"]
    assert fields(smaller_min)["min_pixels"] == 28 * 28
    larger_max = copy("max", processor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 32))
    assert changed(larger_max) == ["max_pixels", "prompt_files_digest"]
    assert changed(larger_max, max_pixels=56 * 56) == ["prompt_files_digest"]  # the config's max wins
    hub_layout = tmp_path / "hub" / "preprocessor_config.json"  # the hub's: bounds at the top level
    hub_layout.parent.mkdir()
    hub_layout.write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14}))
    size = Qwen2VLImageProcessorPil.from_pretrained(str(hub_layout.parent)).size
    assert (size["shortest_edge"], size["longest_edge"]) == (3136, 12845056)
    got = fields(hub_layout.parent)
    assert (got["min_pixels"], got["max_pixels"]) == (3136, 12845056)

    folder = str(tmp_path / "cache")  # a resume with another system prompt is refused
    with CacheWriter(folder, dim=64, context_length=40, dtype="float32", fingerprint=fields(base)) as writer:
        writer.add("a", np.zeros((3, 64), np.float32))
    with pytest.raises(CacheMismatch, match=r"\(encoder.prompt_files_digest: cache '[0-9a-f]{16}', config"):
        CacheWriter(folder, dim=64, context_length=40, dtype="float32", fingerprint=fields(copy("b", system)))


def test_two_stage_rewrite(encoder):
    _, mask = encoder.encode([_image(4)], ["what is the object that is round?"])
    assert encoder.last_rewrites == [None]  # rewriting is asked for per text, never by default
    _, mask = encoder.encode(
        [_image(4), _image(5)], ["what is the object that is round?", "the square"], rewrite=[True, False]
    )
    assert isinstance(encoder.last_rewrites[0], str) and encoder.last_rewrites[1] is None
    assert len(encoder.tokenizer(encoder.last_rewrites[0]).input_ids) <= 6 + 2
    assert mask.shape == (2, 40)


def test_cache_from_qwen_equals_direct(encoder, tiny_qwen, tmp_path):
    from genmask_jax.data.sources import make_task_source

    c = qwen_config(tiny_qwen)
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


def _reasonseg(root):
    folder = root / "rs" / "val"
    folder.mkdir(parents=True)
    shape = [{"label": "target", "points": [[2, 2], [20, 2], [20, 20], [2, 20]]}]
    for stem, text, long in (("a", "what would you sit on here?", True), ("b", "the square", False)):
        Image.fromarray(_image(7, 40, 40)).save(folder / f"{stem}.jpg")
        annotation = {"text": [text], "is_sentence": long, "shapes": shape}
        (folder / f"{stem}.json").write_text(json.dumps(annotation))
    return str(root / "rs")


def test_precompute_rewrites_reasoning_queries_and_records_them(encoder, tiny_qwen, tmp_path):
    c = qwen_config(tiny_qwen, rewrite_reasoning=True)
    c.seg_sources, c.gen_sources, c.reasonseg.root = "reasonseg", "", _reasonseg(tmp_path)
    precompute(c, str(tmp_path / "cache"), ["val"], batch_size=2, dtype="float32", encoder=encoder)
    cache = EmbeddingCache(str(tmp_path / "cache"))
    header_a, _ = cache.record("reasonseg-val-a-0")
    header_b, _ = cache.record("reasonseg-val-b-0")
    assert isinstance(header_a["rewrite"], str) and header_b["rewrite"] is None
    assert header_a["text"].startswith("what would you sit on here?")


def test_two_stage_rewriting_is_the_same_with_and_without_the_cache(encoder, tiny_qwen, tmp_path):
    """One rule (`encoders.encoder_input`): only `is_sentence` queries are rewritten, from the raw query."""
    c = qwen_config(tiny_qwen, rewrite_reasoning=True)
    c.seg_sources, c.gen_sources, c.reasonseg.root = "reasonseg", "", _reasonseg(tmp_path)
    precompute(c, str(tmp_path / "cache"), ["val"], batch_size=1, dtype="float32", encoder=encoder)
    direct = next(iter(make_eval_iterator(c, "val", 2, process_index=0, process_count=1)))
    c.encoder.cache_dir = str(tmp_path / "cache")
    cached = next(iter(make_eval_iterator(c, "val", 2, process_index=0, process_count=1)))
    np.testing.assert_array_equal(direct["context_mask"], cached["context_mask"])
    np.testing.assert_allclose(direct["context"], cached["context"], atol=1e-4)
    from genmask_jax.data.reasonseg import query_text

    image = np.asarray(Image.open(tmp_path / "rs" / "val" / "b.jpg"))
    short, _ = encoder.encode([image], [query_text("the square", is_sentence=False)])
    np.testing.assert_allclose(direct["context"][1], short[0], atol=1e-4)  # not rewritten


def test_context_shape_reads_the_model_config(tiny_qwen):
    from genmask_jax.data.pipeline import context_shape

    c = default_data_config()
    c.encoder.name, c.encoder.model_path, c.encoder.context_length = "qwen2_5_vl", tiny_qwen, 77
    assert context_shape(c) == (77, 64)


def test_an_empty_batch_gives_empty_arrays_as_the_toy_encoder_does(encoder):
    """`tokenizer.pad` of no prompts raised IndexError; `train/latent_data.py` encodes empty batches."""
    for images in ([], None):
        context, mask = encoder.encode(images, [])
        assert (context.shape, context.dtype) == ((0, 40, 64), np.float32)
        assert (mask.shape, mask.dtype) == ((0, 40), bool)


def test_encode_runs_one_call_at_a_time(encoder, monkeypatch):
    """`make_encoder` gives every consumer of a process one encoder, and the pipelines' threads call it;
    a call changes the tokenizer's padding side, `last_rewrites` and the model's `rope_deltas`."""
    held = []
    model_inputs = encoder.model_inputs

    def recording(*args, **kwargs):
        held.append(encoder._lock.locked())
        return model_inputs(*args, **kwargs)

    monkeypatch.setattr(encoder, "model_inputs", recording)
    encoder.encode([_image(4)], ["what is the object that is round?"], rewrite=[True])
    assert held == [True, True]  # the rewrite's inputs, then the encoded ones


def test_make_encoder_reuses_the_loaded_model(tiny_qwen, monkeypatch):
    import genmask_jax.encoders

    monkeypatch.setattr(genmask_jax.encoders, "_BUILT", type(genmask_jax.encoders._BUILT)())
    first = make_encoder(qwen_config(tiny_qwen, device="cpu").encoder)
    assert make_encoder(qwen_config(tiny_qwen, device="cpu").encoder) is first
    assert make_encoder(qwen_config(tiny_qwen, device="cpu", rewrite_max_new_tokens=3).encoder) is not first
    freed = weakref.ref(first)  # dropped by its last consumer, the model goes
    del first
    gc.collect()
    assert freed() is None


def _gpu_torch(monkeypatch, count=2):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def _jax_backend(monkeypatch, backend, initialized=True):
    """JAX as this process would have it: `backend` None = not imported."""
    import sys
    import types

    from jax._src import xla_bridge

    if backend is None:
        monkeypatch.delitem(sys.modules, "jax")
        return

    def default_backend():
        assert initialized, "asked JAX for its backend before it started one: that starts it"
        return backend

    monkeypatch.setitem(sys.modules, "jax", types.SimpleNamespace(default_backend=default_backend))
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: initialized)


@pytest.mark.parametrize(
    "jax_backend, initialized, want",
    [
        (None, True, "cuda"),  # the precompute: JAX never imported
        ("gpu", False, "cuda"),  # imported, no backend started yet (and not started by asking)
        ("cpu", True, "cuda"),
        ("gpu", True, "cpu"),  # segment, generate, evaluate, train: JAX holds the GPU
    ],
)
def test_auto_puts_the_encoder_on_a_gpu_that_jax_does_not_hold(
    monkeypatch, caplog, jax_backend, initialized, want
):
    """The encoder went to cuda:0 whenever torch had CUDA, beside JAX's 75% (92% under launch/gpu.sh) of
    the same GPU, where Qwen2.5-VL-7B's 16.6 GB may not fit (the warning said it would not: at 75% an 80 GB
    card keeps 20 GB)."""
    from genmask_jax.encoders.qwen2_5_vl import resolve_device

    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    _gpu_torch(monkeypatch)
    _jax_backend(monkeypatch, jax_backend, initialized)
    with caplog.at_level("WARNING", logger="genmask_jax.encoders.qwen2_5_vl"):
        assert resolve_device("auto") == want
        assert resolve_device("cuda:1") == "cuda:1"  # asked for: the user lowered JAX's memory fraction
        assert resolve_device("cpu") == "cpu"
    if want == "cpu":
        assert "--config.data.encoder.device=cuda with XLA_PYTHON_CLIENT_MEM_FRACTION lowered" in caplog.text
        assert "(XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 of its memory" in caplog.text
        assert "may not fit" in caplog.text and "would not fit" not in caplog.text
        assert len(caplog.records) == 1
    else:
        assert caplog.text == ""


def test_the_encoder_device_setting(tiny_qwen, monkeypatch):
    import genmask_jax.encoders
    from genmask_jax.encoders import EncoderUnavailable, check_available
    from genmask_jax.encoders.qwen2_5_vl import resolve_device

    _gpu_torch(monkeypatch, count=0)
    assert resolve_device("auto") == "cpu"
    for device in ("cuda", "cuda:0"):
        with pytest.raises(EncoderUnavailable, match=f"device={device}, but torch .* sees 0 CUDA devices"):
            resolve_device(device)
    _gpu_torch(monkeypatch, count=2)
    with pytest.raises(EncoderUnavailable, match="sees 2 CUDA devices"):
        resolve_device("cuda:2")
    for device in ("gpu", "cuda:", "CPU"):  # refused before anything loads
        with pytest.raises(EncoderUnavailable, match=f"device={device!r}: use auto, cpu, cuda or cuda:N"):
            check_available(qwen_config(tiny_qwen, device=device).encoder)
    # where it runs changes a context by rounding only, as the batch does: the cache key ignores it
    on_gpu = qwen_config(tiny_qwen, device="cuda").encoder
    assert fingerprint(on_gpu) == fingerprint(qwen_config(tiny_qwen).encoder)

    _jax_backend(monkeypatch, "gpu")  # a command that runs JAX on the GPU builds the encoder on the CPU
    monkeypatch.setattr(genmask_jax.encoders, "_BUILT", type(genmask_jax.encoders._BUILT)())
    assert make_encoder(qwen_config(tiny_qwen).encoder).device == "cpu"


def test_the_rewrite_ignores_the_model_folders_generation_config(encoder, tiny_qwen, tmp_path):
    """generate() took every setting but the two it was given from the folder's generation_config.json,
    a file in no digest: a repetition_penalty there changed the rewrites under an unchanged cache key."""
    path = shutil.copytree(tiny_qwen, tmp_path / "qwen")
    settings = json.loads((path / "generation_config.json").read_text())
    settings.update(repetition_penalty=5.0, no_repeat_ngram_size=1)
    (path / "generation_config.json").write_text(json.dumps(settings))
    other = Qwen25VLEncoder(
        str(path), context_length=40, dtype="float32", device="cpu", rewrite_max_new_tokens=6
    )
    image, query = _image(4), "what is the object that is round?"
    context, _ = encoder.encode([image], [query], rewrite=[True])
    other_context, _ = other.encode([image], [query], rewrite=[True])
    assert other.last_rewrites == encoder.last_rewrites
    np.testing.assert_array_equal(other_context, context)
    assert fingerprint(qwen_config(tiny_qwen, rewrite_reasoning=True).encoder)["rewrite_decoding"] == {
        "do_sample": False,
        "num_beams": 1,
        "repetition_penalty": 1.0,
    }


def test_a_resume_after_the_images_changed_stops(encoder, tiny_qwen, tmp_path):
    """A rerun into the same folder counted every record "already" cached, and readers then refused them
    with advice to precompute again, which the user had just done."""
    c = qwen_config(tiny_qwen)
    c.gen_sources, c.shapes.val_size = "", 3
    precompute(c, str(tmp_path), ["val"], batch_size=2, dtype="float32", encoder=encoder)
    c.resolution = (40, 40)  # the same ids and texts, other images
    stale = r"synthetic/val: .*from a 32x32x3 uint8 image, the data now gives 40x40x3.*NEW_FOLDER"
    with pytest.raises(PrecomputeError, match=stale):
        precompute(c, str(tmp_path), ["val"], batch_size=2, dtype="float32", encoder=encoder)

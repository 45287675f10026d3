"""`qwen2_5_vl`: Qwen2.5-VL (transformers, PyTorch) as the instruction encoder, as in GenMask.

The image and the instruction go through the model's chat template as one user turn
(`<|vision_start|><|image_pad|>...<|vision_end|>instruction`); the context is the language model's last
hidden states over the whole prompt (`(B, L, 3584)` for the 7B model), zero-padded to `L`.
Texts without an image (captions for generation) are encoded as text-only turns.

The instruction comes last in the prompt, so a prompt with an image longer than `L` is refused
(`PromptTooLong`, with its lengths) rather than cut: cutting it would drop the instruction and leave
contexts that no longer depend on it. A text-only prompt (a caption) longer than `L` is cut with a
warning, its end first, keeping the chat template's closing tokens (`<|im_end|>` and any generation
prompt). `max_pixels` bounds the image's share: the image processor resizes so that
H * W <= max_pixels, and each 28 x 28 patch (14-pixel patches merged 2 x 2) is one token. None keeps the
model's preprocessor_config.json value (Qwen2.5-VL's 12845056: up to 16384 image tokens, refused for any
context_length up to that).

We build the model inputs ourselves rather than through `Qwen2_5_VLProcessor`, whose constructor needs
the torchvision video processor: the PIL image processor (`Qwen2VLImageProcessorPil`) gives
`pixel_values` and `image_grid_thw`, each image placeholder is expanded to
`prod(grid_thw) / merge_size**2` tokens (what the processor does), and `mm_token_type_ids`
(0 text, 1 image) is passed explicitly: without it transformers 5 silently falls back to 1D positions
instead of M-RoPE.

Two-stage reasoning (`encode(..., rewrite=flags)`): the VLM first answers the flagged queries with a
short referring description (greedy, at most `rewrite_max_new_tokens` tokens) and that description is
what gets encoded; `last_rewrites` keeps the generated texts for the embedding cache's records. Which
examples are rewritten is the data's rule (`genmask_jax.encoders.encoder_input`), not the encoder's.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence

import numpy as np

from genmask_jax.encoders import check_device, check_model_folder
from genmask_jax.encoders.base import (
    ContextError,
    EncoderUnavailable,
    PromptTooLong,
    TruncationWarner,
    pad_or_truncate,
)

log = logging.getLogger(__name__)

REWRITE_PROMPT = (
    "{query}\nAnswer with a short referring expression (a few words) that names the object in the image "
    "that this request is about."
)
# The version of how `model_inputs` builds the model's input from an instruction and an image (the chat
# turn, the image placeholder's expansion, the cut of long captions): bump it with any change there,
# which changes contexts; the cache fingerprint records it, so that caches written before are refused.
PROMPT_VERSION = 1
# How the rewrite decodes, whatever the model folder's generation_config.json says (the released
# Qwen2.5-VL-7B-Instruct's sets repetition_penalty 1.05, which greedy decoding applies too): the cache
# fingerprint records it, and the folder's file is in no digest.
REWRITE_DECODING = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0}
_TORCH_DTYPES = ("float32", "bfloat16", "float16")
_MARK = "\ue000"  # stands for the user text in a rendered chat template


def jax_gpu_backend() -> str | None:
    """The platform of the GPU backend JAX runs on in this process; None where JAX is not imported, has
    started no backend yet (asking would start one, claiming 75% of the GPU in a process such as the
    precompute that never uses JAX) or runs on the CPU or a TPU."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    try:
        from jax._src import xla_bridge

        if not xla_bridge.backends_are_initialized():
            return None
    except (ImportError, AttributeError):  # a JAX without this private check: ask it
        pass
    backend = jax.default_backend()
    return backend if backend in ("gpu", "cuda", "rocm") else None


def resolve_device(device: str = "auto") -> str:
    """The torch device of a `data.encoder.device`: "cpu", "cuda" and "cuda:N" as given (a CUDA one
    only where torch has that device); "auto" is CUDA where torch has it and JAX does not run on a GPU
    in this process, else the CPU. Beside JAX the VLM may not fit: JAX reserves 75% of the GPU's memory
    (92% under launch/gpu.sh), which leaves 20 GB (6.4 GB) of an 80 GB card, and Qwen2.5-VL-7B's weights
    alone take 16.6 GB in bfloat16."""
    import torch

    check_device(device)
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise EncoderUnavailable(
                f"data.encoder.device={device}, but torch {torch.__version__} sees {count} CUDA devices: "
                "use cpu or auto (or install torch's CUDA build)"
            )
        return device
    if device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    backend = jax_gpu_backend()
    if backend is None:
        return "cuda"
    log.warning(
        "the Qwen encoder runs on the CPU (data.encoder.device=auto): JAX holds the %s in this process "
        "(XLA_PYTHON_CLIENT_MEM_FRACTION=%s of its memory: 0.75 leaves 20 GB of an 80 GB card) and the VLM "
        "may not fit beside it (Qwen2.5-VL-7B's weights: 16.6 GB in bfloat16, before activations); to run "
        "it there, --config.data.encoder.device=cuda with XLA_PYTHON_CLIENT_MEM_FRACTION lowered if it "
        "needs room, or read contexts from an embedding cache (data.encoder.cache_dir)",
        backend,
        os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"),
    )
    return "cpu"


class Qwen25VLEncoder:
    """`encode(images, texts, rewrite=None) -> (context (B, L, D) float32, mask (B, L) bool)`.

    `device`: a `data.encoder.device` (`resolve_device`; None: "auto"). `encode` runs one call at a time,
    so threads may share the encoder (`make_encoder` gives every consumer of a process the same one).
    `last_rewrites` (the texts the last `encode` rewrote its flagged queries to, None for the others) is
    not shared that way: its caller reads it after the lock is released, so it is meaningful only where no
    other thread encodes meanwhile (the precompute, its one reader, encodes on one thread).
    """

    name = "qwen2_5_vl"

    def __init__(
        self,
        model_path: str,
        context_length: int = 512,
        dtype: str = "bfloat16",
        rewrite_max_new_tokens: int = 32,
        device: str | None = None,
        max_pixels: int | None = None,
        add_generation_prompt: bool = False,
    ):
        check_model_folder(model_path)
        import torch
        from transformers import AutoTokenizer, GenerationConfig, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {_TORCH_DTYPES}, got {dtype!r}")
        self.torch = torch
        self.device = resolve_device(device or "auto")
        self.dtype, self.torch_dtype = dtype, getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "right"
        kwargs = {"max_pixels": max_pixels} if max_pixels else {}
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_path, **kwargs)
        self.merge_size = getattr(self.image_processor, "merge_size", 2)
        pixels = self.image_processor.size["longest_edge"]
        self.max_image_tokens = pixels // (self.image_processor.patch_size * self.merge_size) ** 2
        if self.max_image_tokens >= context_length:  # before loading the model: fail in seconds
            origin = "" if max_pixels else " (max_pixels 0: the model's preprocessor_config.json)"
            raise ValueError(
                f"max_pixels={pixels}{origin} lets an image take up to {self.max_image_tokens} tokens, all "
                f"of context_length={context_length}: lower data.encoder.max_pixels or raise context_length"
            )
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, dtype=self.torch_dtype)
        self.model.to(self.device).eval()
        self.model.generation_config = GenerationConfig(
            **REWRITE_DECODING,
            # Qwen's generation_config.json stops at both, <|im_end|> and <|endoftext|>
            eos_token_id=sorted({self.tokenizer.eos_token_id, self.tokenizer.pad_token_id} - {None}),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        config = self.model.config
        self.image_token_id = config.image_token_id
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.dim = config.text_config.hidden_size
        self.context_length = context_length
        self.rewrite_max_new_tokens = rewrite_max_new_tokens
        self.add_generation_prompt = add_generation_prompt
        self.last_rewrites: list[str | None] = []
        self.model_path = model_path
        self._warn = TruncationWarner(self.name)
        # the calls change `tokenizer.padding_side`, `last_rewrites` and the model's `rope_deltas`
        self._lock = threading.Lock()
        log.info("Qwen2.5-VL encoder from %s: hidden %d, %s on %s", model_path, self.dim, dtype, self.device)

    def _prompt(self, has_image: bool, text: str, generation_prompt: bool) -> str:
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": text}]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=generation_prompt
        )

    def model_inputs(
        self,
        images: Sequence[np.ndarray | None],
        texts: Sequence[str],
        generation_prompt: bool,
        padding_side: str = "right",
        max_length: int | None = None,
    ) -> dict:
        """Token ids, attention mask, `mm_token_type_ids` and pixel inputs for a batch (torch tensors);
        text-only prompts longer than `max_length` tokens are cut (`fit_text_only`)."""
        prompts = [self._prompt(im is not None, t, generation_prompt) for im, t in zip(images, texts)]
        present = [np.asarray(im, np.uint8) for im in images if im is not None]
        inputs = {}
        if present:
            # left to guess, the processor reads an (H, W, 3) image with H = 1 or 3 as (C, H, W)
            pixels = self.image_processor(
                images=present, return_tensors="pt", input_data_format="channels_last"
            )
            counts = iter((pixels["image_grid_thw"].prod(-1) // self.merge_size**2).tolist())
            prompts = [
                p.replace(self.image_token, self.image_token * next(counts), 1) if im is not None else p
                for p, im in zip(prompts, images)
            ]
            inputs["pixel_values"] = pixels["pixel_values"].to(self.device, self.torch_dtype)
            inputs["image_grid_thw"] = pixels["image_grid_thw"].to(self.device)
        self.tokenizer.padding_side = padding_side
        ids = self.tokenizer(prompts)["input_ids"]
        if max_length is not None:
            ids = [
                self.fit_text_only(i, max_length, generation_prompt, t) if im is None else i
                for i, im, t in zip(ids, images, texts)
            ]
        tokens = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        inputs["input_ids"] = tokens["input_ids"].to(self.device)
        inputs["attention_mask"] = tokens["attention_mask"].to(self.device)
        inputs["mm_token_type_ids"] = (tokens["input_ids"] == self.image_token_id).long().to(self.device)
        return inputs

    def fit_text_only(self, ids: list[int], max_length: int, generation_prompt: bool, text: str) -> list[int]:
        """A text-only prompt's token ids cut to `max_length`: the user text loses its end, the chat
        template's closing tokens stay. Unchanged when it fits, or when the cut would leave no user
        text (`check_lengths` then refuses it)."""
        if len(ids) <= max_length:
            return ids
        head, tail = self._prompt(False, _MARK, generation_prompt).split(_MARK)
        head_length = len(self.tokenizer(head, add_special_tokens=False)["input_ids"])
        tail_ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"]
        keep = max_length - len(tail_ids)
        if keep <= head_length or ids[len(ids) - len(tail_ids) :] != tail_ids:
            return ids
        self._warn(len(ids), max_length, text)
        return ids[:keep] + tail_ids

    def rewrite(self, images: Sequence[np.ndarray | None], queries: Sequence[str]) -> list[str]:
        """Stage one of reasoning segmentation: a short description of the queried object (greedy)."""
        prompts = [REWRITE_PROMPT.format(query=q) for q in queries]
        inputs = self.model_inputs(images, prompts, generation_prompt=True, padding_side="left")
        with self.torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.rewrite_max_new_tokens)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [t.strip() or q for t, q in zip(texts, queries)]

    def check_lengths(self, inputs: dict, texts: Sequence[str]) -> None:
        """Raises `PromptTooLong` for the first prompt of the batch longer than `context_length`."""
        lengths = inputs["attention_mask"].sum(1).tolist()
        image_tokens = inputs["mm_token_type_ids"].sum(1).tolist()
        for i, (n, n_image) in enumerate(zip(lengths, image_tokens)):
            if n > self.context_length:
                advice = "raise context_length" + (" or lower data.encoder.max_pixels" if n_image else "")
                raise PromptTooLong(
                    f"prompt of {n} tokens ({n_image} image tokens, {n - n_image} chat template and "
                    f"instruction tokens) does not fit context_length={self.context_length}; {advice}; "
                    f"instruction {texts[i][:200]!r}",
                    index=i,
                )

    def encode(
        self,
        images: Sequence[np.ndarray | None] | None,
        texts: Sequence[str],
        rewrite: Sequence[bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`rewrite[i]`: rewrite text `i` first (two-stage reasoning); None rewrites nothing."""
        with self._lock:
            return self._encode(images, texts, rewrite)

    def _encode(self, images, texts, rewrite) -> tuple[np.ndarray, np.ndarray]:
        if not texts:
            self.last_rewrites = []
            shape = (0, self.context_length)
            return np.zeros((*shape, self.dim), np.float32), np.zeros(shape, bool)
        images = list(images) if images is not None else [None] * len(texts)
        texts = list(texts)
        flags = [False] * len(texts) if rewrite is None else [bool(r) for r in rewrite]
        self.last_rewrites = [None] * len(texts)
        chosen = [i for i, f in enumerate(flags) if f]
        if chosen:
            rewritten = self.rewrite([images[i] for i in chosen], [texts[i] for i in chosen])
            for i, text in zip(chosen, rewritten):
                self.last_rewrites[i], texts[i] = text, text
        inputs = self.model_inputs(
            images, texts, generation_prompt=self.add_generation_prompt, max_length=self.context_length
        )
        self.check_lengths(inputs, texts)
        with self.torch.no_grad():
            states = self.model.model(**inputs).last_hidden_state
        states = states.float().cpu().numpy()
        valid = inputs["attention_mask"].bool().cpu().numpy()
        kept = [s[m] for s, m in zip(states, valid)]
        for text, k in zip(texts, kept):
            if not np.isfinite(k).all():
                raise ContextError(
                    f"Qwen2.5-VL in {self.dtype} (data.encoder.dtype) gave non-finite hidden states for "
                    f"{text[:200]!r}: use bfloat16 or float32 (float16 overflows in Qwen2.5's activations), "
                    f"or check the weights in {self.model_path}"
                )
        pairs = [pad_or_truncate(k, self.context_length) for k in kept]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

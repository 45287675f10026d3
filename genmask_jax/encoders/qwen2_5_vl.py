"""`qwen2_5_vl`: Qwen2.5-VL (transformers, PyTorch) as the instruction encoder, as in GenMask.

The image and the instruction go through the model's chat template as one user turn
(`<|vision_start|><|image_pad|>...<|vision_end|>instruction`); the context is the language model's last
hidden states over the whole prompt (`(B, L, 3584)` for the 7B model), padded / truncated to `L`.
Texts without an image (captions for generation) are encoded as text-only turns.

We build the model inputs ourselves rather than through `Qwen2_5_VLProcessor`, whose constructor needs
the torchvision video processor: the PIL image processor (`Qwen2VLImageProcessorPil`) gives
`pixel_values` and `image_grid_thw`, each image placeholder is expanded to
`prod(grid_thw) / merge_size**2` tokens (what the processor does), and `mm_token_type_ids`
(0 text, 1 image) is passed explicitly: without it transformers 5 silently falls back to 1D positions
instead of M-RoPE (DESIGN.md 2).

Two-stage reasoning (`rewrite`): the VLM first answers the long query with a short referring
description (greedy, at most `rewrite_max_new_tokens` tokens) and that description is what gets
encoded; `last_rewrites` keeps the generated texts for the embedding cache's records.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from genmask_jax.encoders.base import TruncationWarner, pad_or_truncate

log = logging.getLogger(__name__)

REWRITE_PROMPT = (
    "{query}\nAnswer with a short referring expression (a few words) that names the object in the image "
    "that this request is about."
)
_TORCH_DTYPES = ("float32", "bfloat16", "float16")


class Qwen25VLEncoder:
    """`encode(images, texts, rewrite=None) -> (context (B, L, D) float32, mask (B, L) bool)`."""

    name = "qwen2_5_vl"

    def __init__(
        self,
        model_path: str,
        context_length: int = 512,
        dtype: str = "bfloat16",
        rewrite_reasoning: bool = False,
        rewrite_max_new_tokens: int = 32,
        device: str | None = None,
        max_pixels: int | None = None,
        add_generation_prompt: bool = False,
    ):
        import torch
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        if not model_path:
            raise ValueError("data.encoder.model_path is empty: give a local Qwen2.5-VL folder or a hub id")
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {_TORCH_DTYPES}, got {dtype!r}")
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.torch_dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "right"
        kwargs = {"max_pixels": max_pixels} if max_pixels else {}
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_path, **kwargs)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, dtype=self.torch_dtype)
        self.model.to(self.device).eval()
        config = self.model.config
        self.image_token_id = config.image_token_id
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.merge_size = getattr(self.image_processor, "merge_size", 2)
        self.dim = config.text_config.hidden_size
        self.context_length = context_length
        self.rewrite_reasoning, self.rewrite_max_new_tokens = rewrite_reasoning, rewrite_max_new_tokens
        self.add_generation_prompt = add_generation_prompt
        self.last_rewrites: list[str | None] = []
        self._warn = TruncationWarner(self.name)
        self.model_path = model_path
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
    ) -> dict:
        """Token ids, attention mask, `mm_token_type_ids` and pixel inputs for a batch (torch tensors)."""
        prompts = [self._prompt(im is not None, t, generation_prompt) for im, t in zip(images, texts)]
        present = [np.asarray(im, np.uint8) for im in images if im is not None]
        inputs = {}
        if present:
            pixels = self.image_processor(images=present, return_tensors="pt")
            counts = iter((pixels["image_grid_thw"].prod(-1) // self.merge_size**2).tolist())
            prompts = [
                p.replace(self.image_token, self.image_token * next(counts), 1) if im is not None else p
                for p, im in zip(prompts, images)
            ]
            inputs["pixel_values"] = pixels["pixel_values"].to(self.device, self.torch_dtype)
            inputs["image_grid_thw"] = pixels["image_grid_thw"].to(self.device)
        self.tokenizer.padding_side = padding_side
        tokens = self.tokenizer(prompts, padding=True, return_tensors="pt")
        inputs["input_ids"] = tokens["input_ids"].to(self.device)
        inputs["attention_mask"] = tokens["attention_mask"].to(self.device)
        inputs["mm_token_type_ids"] = (tokens["input_ids"] == self.image_token_id).long().to(self.device)
        return inputs

    def rewrite(self, images: Sequence[np.ndarray | None], queries: Sequence[str]) -> list[str]:
        """Stage one of reasoning segmentation: a short description of the queried object (greedy)."""
        prompts = [REWRITE_PROMPT.format(query=q) for q in queries]
        inputs = self.model_inputs(images, prompts, generation_prompt=True, padding_side="left")
        with self.torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.rewrite_max_new_tokens, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [t.strip() or q for t, q in zip(texts, queries)]

    def hidden_states(self, images: Sequence[np.ndarray | None], texts: Sequence[str]) -> list[np.ndarray]:
        """Per example float32 `(T_i, D)` last hidden states over the prompt's real tokens."""
        inputs = self.model_inputs(images, texts, generation_prompt=self.add_generation_prompt)
        with self.torch.no_grad():
            states = self.model.model(**inputs).last_hidden_state
        states = states.float().cpu().numpy()
        mask = inputs["attention_mask"].bool().cpu().numpy()
        return [s[m] for s, m in zip(states, mask)]

    def encode(
        self,
        images: Sequence[np.ndarray | None] | None,
        texts: Sequence[str],
        rewrite: Sequence[bool] | bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        images = list(images) if images is not None else [None] * len(texts)
        if rewrite is None:
            rewrite = self.rewrite_reasoning
        flags = [bool(rewrite)] * len(texts) if isinstance(rewrite, bool) else [bool(r) for r in rewrite]
        texts = list(texts)
        self.last_rewrites = [None] * len(texts)
        chosen = [i for i, f in enumerate(flags) if f]
        if chosen:
            rewritten = self.rewrite([images[i] for i in chosen], [texts[i] for i in chosen])
            for i, text in zip(chosen, rewritten):
                self.last_rewrites[i], texts[i] = text, text
        contexts, masks = [], []
        for text, states in zip(texts, self.hidden_states(images, texts)):
            if states.shape[0] > self.context_length:
                self._warn(states.shape[0], self.context_length, text)
            context, mask = pad_or_truncate(states, self.context_length)
            contexts.append(context)
            masks.append(mask)
        return np.stack(contexts), np.stack(masks)

    def fingerprint(self) -> dict:
        """What the cache records to refuse mixing contexts from different encoders."""
        return {
            "encoder": self.name,
            "model": os.path.basename(os.path.normpath(self.model_path)),
            "dim": self.dim,
            "context_length": self.context_length,
            "add_generation_prompt": self.add_generation_prompt,
        }

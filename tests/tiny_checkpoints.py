"""Tiny checkpoints of the other two student families, laid out like their hub folders (save_pretrained: config,
weights, tokenizer with chat template and special tokens, image processor), so every path runs without a download:

- Qwen2-VL (`Qwen2VLForConditionalGeneration`, like Qwen/Qwen2-VL-7B-Instruct): the tiny student's tokenizer and
  image processor (the Qwen2-VL family shares both), a Qwen2-VL model of another size and mRoPE split;
- InternVL3 (`InternVLForConditionalGeneration`, like OpenGVLab/InternVL3-1B-hf): the tiny student's BPE recipe
  with InternVL's extra special tokens (<img>, </img>, <IMG_CONTEXT>, ...) and chat template, Got-OCR2's image
  processor (PIL backend) cutting pictures into 56 px tiles plus a thumbnail, and a Qwen2 language model behind a
  one-layer InternViT with pixel shuffle: 4 <IMG_CONTEXT> tokens per tile (the real checkpoints: 448 px tiles,
  256 tokens each, up to 12 tiles).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from data.tiny_student import SPECIAL, build_model, corpus, image_processor, train_tokenizer

# InternVL3-hf's tokens on top of Qwen's, and the names its processor reads them by (tokenizer.start_image_token, ...).
INTERNVL_SPECIAL = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
                    "<video>"]
INTERNVL_NAMED = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                  "video_token": "<video>"}
# InternVL3-hf's chat template: ChatML, no default system message, an image is "<IMG_CONTEXT>\n" before the text.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}")
TILE = 56  # px per tile: 4 x 4 patches of 14 px, pixel-shuffled to 2 x 2 = 4 tokens


def save(out: Path, model, tok, proc) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for part in (model, tok, proc):
        part.save_pretrained(out)
    return out


def build_tiny_qwen2vl(data_dir: Path, out: Path, seed: int = 1) -> Path:
    """Qwen2-VL: 2 layers, 96 wide, 3 query heads / 1 KV head, mRoPE sections [2, 7, 7]."""
    tok = train_tokenizer(corpus(Path(data_dir)))
    text = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=3,
                num_key_value_heads=1, initializer_range=0.1,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 7, 7]})
    vision = dict(depth=1, embed_dim=32, hidden_size=96, num_heads=2, mlp_ratio=2)
    model = build_model(tok, seed, text, vision, Qwen2VLConfig, Qwen2VLForConditionalGeneration)
    return save(Path(out), model, tok, image_processor())


def build_tiny_internvl(data_dir: Path, out: Path, seed: int = 2) -> Path:
    """InternVL3: a 2-layer Qwen2 language model (64 wide, 4 query / 2 KV heads, 1-D RoPE, tied embeddings as in
    InternVL3-1B) behind a 1-layer InternViT on 56 px tiles, pixel shuffle 0.5, the MLP projector."""
    tok = train_tokenizer(corpus(Path(data_dir)), special=SPECIAL + INTERNVL_SPECIAL,
                          chat_template=INTERNVL_CHAT_TEMPLATE, named=INTERNVL_NAMED)
    eos, pad = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = InternVLConfig(
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                         max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                         eos_token_id=eos, pad_token_id=pad, bos_token_id=None),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=TILE, patch_size=14, initializer_range=0.1),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=(TILE // 28) ** 2,
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    proc = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, max_patches=4, image_mean=[0.485, 0.456, 0.406],
                                    image_std=[0.229, 0.224, 0.225])   # InternVL3-hf's values, 56 px tiles
    return save(Path(out), model, tok, proc)

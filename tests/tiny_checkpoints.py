"""Tiny checkpoints of the other student families and of an MoE teacher, laid out like their hub folders
(save_pretrained: config, weights, tokenizer with chat template and special tokens, image processor), so every
path runs without a download:

- Qwen2-VL (`Qwen2VLForConditionalGeneration`, like Qwen/Qwen2-VL-7B-Instruct): the tiny student's tokenizer
  and image processor (the Qwen2-VL family shares both), a Qwen2-VL model of another size and mRoPE split;
- InternVL3 (`InternVLForConditionalGeneration`, like OpenGVLab/InternVL3-1B-hf): the tiny student's BPE
  recipe with InternVL's extra special tokens (<img>, </img>, <IMG_CONTEXT>, ...) and chat template,
  Got-OCR2's image processor (PIL backend) cutting pictures into 56 px tiles plus a thumbnail, and a Qwen2
  language model behind a one-layer InternViT with pixel shuffle: 4 <IMG_CONTEXT> tokens per tile (the real
  checkpoints: 448 px tiles, 256 tokens each, up to 12 tiles);
- Qwen3-VL (`Qwen3VLForConditionalGeneration`, like Qwen/Qwen3-VL-8B-Instruct) and Qwen3-VL-MoE
  (`Qwen3VLMoeForConditionalGeneration`, like Qwen/Qwen3-VL-30B-A3B-Instruct, a teacher): Qwen3-VL's special
  tokens and chat template, Qwen2-VL's image processor class with Qwen3-VL's 16 px patches, q/k-normed
  attention with interleaved mRoPE, and DeepStack (vision features added after the first decoder layers).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (InternVLConfig, InternVLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from data.tiny_student import SPECIAL, build_model, corpus, image_processor, train_tokenizer

# InternVL3-hf's tokens on top of Qwen's, and the names its processor reads them by
# (tokenizer.start_image_token, ...).
INTERNVL_SPECIAL = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>",
                    "</box>", "<video>"]
INTERNVL_NAMED = {"start_image_token": "<img>", "end_image_token": "</img>",
                  "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
# InternVL3-hf's chat template: ChatML, no default system message, an image is "<IMG_CONTEXT>\n" before the
# text.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
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
    """InternVL3: a 2-layer Qwen2 language model (64 wide, 4 query / 2 KV heads, 1-D RoPE, tied embeddings as
    in InternVL3-1B) behind a 1-layer InternViT on 56 px tiles, pixel shuffle 0.5, the MLP projector."""
    tok = train_tokenizer(corpus(Path(data_dir)), special=SPECIAL + INTERNVL_SPECIAL,
                          chat_template=INTERNVL_CHAT_TEMPLATE, named=INTERNVL_NAMED)
    eos, pad = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = InternVLConfig(
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         initializer_range=0.1, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                         eos_token_id=eos, pad_token_id=pad, bos_token_id=None),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=TILE, patch_size=14, initializer_range=0.1),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=(TILE // 28) ** 2,
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    proc = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, max_patches=4,
                                    image_mean=[0.485, 0.456, 0.406],
                                    image_std=[0.229, 0.224, 0.225])   # InternVL3-hf's values, 56 px tiles
    return save(Path(out), model, tok, proc)


# Qwen3-VL's chat template (Qwen3-VL-*-Instruct's, without the tool-calling branches): unlike Qwen2.5-VL's,
# no default system message; an image is <|vision_start|><|image_pad|><|vision_end|> where it stands.
QWEN3VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}{%- else %}"
    "{%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}"
    "{{- '<|im_start|>' + message.role + '\n' }}{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for item in message.content %}"
    "{%- if 'text' in item %}{{- item.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
# Qwen3-VL's tokens after Qwen2.5-VL's (tool calls, FIM, thinking), in the checkpoint's order.
QWEN3_SPECIAL = SPECIAL + ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                           "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
                           "<tool_response>", "</tool_response>", "<think>", "</think>"]
# Tiny Qwen3-VL language model: head_dim 32 != hidden / heads (as in Qwen3), mRoPE sections [6, 5, 5] of the
# 16 rotary frequencies (interleaved t h w t h w ..., the real checkpoints' [24, 20, 20] of 64).
QWEN3_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, initializer_range=0.1, max_position_embeddings=2048,
                  rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5],
                                   "mrope_interleaved": True})
# Tiny Qwen3-VL vision tower: 2 blocks on 16 px patches, merged 2 x 2 (32 x 32 px per image token), a 4 x 4
# learned position grid, DeepStack features after blocks 0 and 1 (added after LM layers 0 and 1; real:
# 8, 16, 24).
QWEN3_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                    num_position_embeddings=16, deepstack_visual_indexes=[0, 1], initializer_range=0.1)


def qwen3vl_image_processor() -> Qwen2VLImageProcessorPil:
    """Qwen3-VL's image processor: Qwen2-VL's class with 16 px patches and mean = std = 0.5 (as the real
    checkpoints' preprocessor_config.json); pixel limits for the embedded scenes (84 -> 96 px, 3 x 3
    tokens)."""
    return Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=256 * 256, patch_size=16,
                                    temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                                    image_std=[0.5, 0.5, 0.5])


def build_tiny_qwen3vl(data_dir: Path, out: Path, seed: int = 3, moe: bool = False) -> Path:
    """Qwen3-VL (dense, like Qwen/Qwen3-VL-8B-Instruct) or, with `moe`, Qwen3-VL-MoE (like Qwen3-VL-30B-A3B):
    each decoder layer's MLP replaced by 4 experts, 2 per token. EOS: <|im_end|> or <|endoftext|>."""
    tok = train_tokenizer(corpus(Path(data_dir)), special=QWEN3_SPECIAL, chat_template=QWEN3VL_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    text = dict(QWEN3_TEXT, vocab_size=len(tok), bos_token_id=None, eos_token_id=eos, pad_token_id=pad)
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1)
    config_class, model_class = ((Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else
                                 (Qwen3VLConfig, Qwen3VLForConditionalGeneration))
    config = config_class(text_config=text, vision_config=QWEN3_VISION, image_token_id=ids["<|image_pad|>"],
                          video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                          vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = [eos, pad]
    model.generation_config.pad_token_id = pad
    return save(Path(out), model, tok, qwen3vl_image_processor())

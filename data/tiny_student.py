"""The tiny student: a real Qwen2.5-VL model, small enough to train on two CPU cores.

    python -m data.tiny_student --data data/embedded --out checkpoints/tiny-student

Builds three things and saves them into one folder with `save_pretrained`, so that every later step
loads them with `from_pretrained(path)` exactly as it would load `Qwen/Qwen2.5-VL-3B-Instruct`:
- a byte-level BPE tokenizer (Qwen2's pre-tokenizer, Qwen's special tokens and chat template) trained
  on the text of the embedded task, so that words are single tokens and sequences stay short;
- the image processor (Qwen2-VL's, PIL backend; 84 px scenes give 3 x 3 = 9 image tokens);
- `Qwen2_5_VLForConditionalGeneration` from a small config, randomly initialised with a seed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from data.scenes import BACKGROUND

# Qwen2.5-VL's special tokens, in the checkpoint's order.
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
           "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2's pre-tokenizer split (digits one by one, words with their leading space).
PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2.5-VL's chat template (system default, images as <|vision_start|><|image_pad|><|vision_end|>).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# The size of the tiny student, chosen by measuring a training step on two cores (see README).
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
              out_hidden_size=128)


def corpus(data_dir: Path) -> list[str]:
    """Every question, answer and response of the embedded task, and the fixed prompts of the discriminator
    and the judge (the tokenizer's training text), so that all of them are short in tokens."""
    from discriminator import SYSTEM
    from rewards import JUDGE_SYSTEM, judge_prompt
    texts = ["You are a helpful assistant.", SYSTEM, "<response>", "</response>", JUDGE_SYSTEM,
             judge_prompt("q", "a", "r")]
    for path in sorted(data_dir.glob("*.jsonl")):
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            texts += [row["question"], row["answer"], row.get("response", "")]
            texts += [r for rs in row.get("teachers", {}).values() for r in rs]
    return [t for t in texts if t]


def train_tokenizer(texts: list[str], vocab_size: int = 1024, special: list[str] = SPECIAL,
                    chat_template: str = CHAT_TEMPLATE, named: dict | None = None) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer, special tokens and chat template. Another
    Qwen2-based family passes its own `special` tokens (appended in order), `chat_template`, and `named`
    special tokens that its processor reads as tokenizer attributes (InternVL: {"context_image_token":
    "<IMG_CONTEXT>", ...})."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    spec = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    qtok = Qwen2Tokenizer(vocab=spec["vocab"], merges=merges, errors="replace", unk_token=None,
                          eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=2048,
                          extra_special_tokens=named)
    qtok.add_tokens(special, special_tokens=True)
    qtok.chat_template = chat_template
    return qtok


def build_model(tok: Qwen2Tokenizer, seed: int = 0, text: dict = TEXT, vision: dict = VISION,
                config_class=Qwen2_5_VLConfig, model_class=Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL (or another Qwen-VL class) from the tiny config, random weights from `seed`, the special
    tokens' ids from `tok`."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    config = config_class(
        text_config=dict(text, vocab_size=len(tok), bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def image_processor() -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's image processor; small scenes are kept at their size (multiples of 28 px).

    Pixels are normalised around the scenes' background colour, so an empty cell is zero and only the shapes
    reach the randomly initialised vision tower. Measured: with CLIP's mean and std the bright background
    dominated every patch, SFT grew that common component until the image tokens were nearly identical
    (spread 4% of their norm), and the SFT student answered at the majority-class rate on every question type;
    with this normalisation the spread stays ~70% and it learns to count objects within the SFT stage."""
    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224, patch_size=14,
                                    temporal_patch_size=2, merge_size=2,
                                    image_mean=[c / 255 for c in BACKGROUND], image_std=[0.5, 0.5, 0.5])


def build_tiny_student(data_dir: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Train the tokenizer on `data_dir`, build the model, save all three into `out`."""
    out = Path(out)
    tok = train_tokenizer(corpus(Path(data_dir)))
    model = build_model(tok, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    image_processor().save_pretrained(out)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/embedded")
    p.add_argument("--out", default="checkpoints/tiny-student")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    path = build_tiny_student(a.data, a.out, a.seed)
    n = sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration.from_pretrained(path).parameters())
    print(f"saved the tiny student ({n / 1e6:.2f}M parameters) to {path}")

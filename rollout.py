"""Rollout: prompts in, responses out.

    prompts = encode_prompts(tokenizer, image_processor, questions, images)  # left-padded, with positions
    out = generate(model, prompts, max_new_tokens=128, num_samples=4, top_p=0.95, top_k=50)
    logp = response_logprobs(model, prompts, out.response_ids, out.response_mask)  # [B*G, T]

`generate` is a hand-written KV-cache loop, not `model.generate`: each prompt (its image included) runs once
and its keys/values are copied to its G samples; the cache is preallocated and finished rows leave it;
positions (3-D mRoPE from the image grid, or 1-D) are computed here; the decoder layers' own submodules run
under SDPA, a dozen tensor ops per layer and step. `response_logprobs` runs the model's own forward (FSDP,
autograd) with the same positions, each prompt once. Families: Qwen2-VL, Qwen2.5-VL, InternVL3, Qwen3-VL.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

# ---- Families: how an image becomes tokens and positions, by config.model_type (text needs no entry) -------
# image_processor: its class name's prefix; image_token: the template's placeholder; kwargs: the processor's;
# per_image: its output per image (Qwen: the grid t, h, w; InternVL: tiles); rows: entry -> pixel_values rows;
# tokens: (entry, tokenizer, processor) -> the placeholder's expansion; inputs; mrope: 3-D positions or 1-D.

def qwen_image_tokens(grid_thw, tokenizer, image_processor) -> list[int]:
    """Qwen-VL: <|image_pad|> once per merge x merge block of patches (28 or, for Qwen3-VL, 32 px square)."""
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return [pad] * (int(grid_thw.prod()) // image_processor.merge_size ** 2)

def internvl_image_tokens(n_tiles, tokenizer, image_processor) -> list[int]:
    """InternVL: <img>, <IMG_CONTEXT> once per token of every tile, </img>; InternViT's 14 px patches,
    pixel-shuffled by 0.5, make one token per 28 x 28 px (256 per 448 px tile; embed_prompts checks)."""
    per_tile = (image_processor.size["height"] // 28) * (image_processor.size["width"] // 28)
    start, context, end = tokenizer.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])
    return [start] + [context] * (per_tile * int(n_tiles)) + [end]

def qwen_mrope_positions(ids: list[int], image_token_id: int, grids: list, merge: int) -> torch.Tensor:
    """3-D (t, h, w) positions [3, L] of one unpadded row, as Qwen-VL's get_rope_index gives them: text adds 1
    to all three; an image's tokens get (p + t, p + row, p + col), the text after it p + max(h, w) on."""
    pos, cur, i, grids = [], 0, 0, iter(grids)
    while i < len(ids):
        j = i
        while j < len(ids) and ids[j] != image_token_id:                      # a run of text tokens
            j += 1
        pos.append(torch.arange(cur, cur + j - i).expand(3, -1))              # [3, j - i]
        cur, i = cur + j - i, j
        if i < len(ids):                                                      # an image
            t, h, w = (int(x) for x in next(grids))
            h, w = h // merge, w // merge
            thw = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            pos.append(torch.stack(thw).reshape(3, -1) + cur)                 # [3, t*h*w]
            cur, i = cur + max(h, w), i + t * h * w
    return torch.cat(pos, 1)

QWEN_VL = dict(image_processor="Qwen2VLImageProcessor", image_token="<|image_pad|>", kwargs={},
               per_image="image_grid_thw", rows=lambda grid: int(grid.prod()), tokens=qwen_image_tokens,
               inputs=("pixel_values", "image_grid_thw"), mrope=True)
INTERNVL = dict(image_processor="GotOcr2ImageProcessor", image_token="<IMG_CONTEXT>",
                kwargs=dict(crop_to_patches=True), per_image="num_patches", rows=int,
                tokens=internvl_image_tokens, inputs=("pixel_values",), mrope=False)
FAMILIES = {"qwen2_vl": QWEN_VL, "qwen2_5_vl": QWEN_VL, "qwen3_vl": QWEN_VL, "qwen3_vl_moe": QWEN_VL,
            "internvl": INTERNVL}

def family_of(image_processor, family: str | None = None) -> dict:
    """The FAMILIES entry of config.model_type (`family`), checked against the image processor; without it,
    the entry whose image processor this is (exact for images: the Qwen-VL generations part only on video)."""
    name = type(image_processor).__name__
    if family is None:
        found = [f for f in FAMILIES.values() if name.startswith(f["image_processor"])]
        if not found:
            raise ValueError(f"no rollout family for image processor {name}; pass family=config.model_type")
        return found[0]
    if family not in FAMILIES:
        raise ValueError(f"no rollout family for model_type {family!r} (known: {', '.join(FAMILIES)}); "
                         "add one to rollout.FAMILIES")
    if not name.startswith(FAMILIES[family]["image_processor"]):
        raise ValueError(f"model_type {family} ships {FAMILIES[family]['image_processor']}, got {name}")
    return FAMILIES[family]

# ---- Prompts and responses as tensors ----------------------------------------------------------------------
def encode_prompts(tokenizer, image_processor, questions: list[str], images: list, system: str | None = None,
                   family: str | None = None) -> dict:
    """Chat prompts, left-padded; `images[i]`: a PIL image, a path, or None; `family`: config.model_type.
    Returns input_ids / attention_mask / mm_token_type_ids [B, P], position_ids ([3, B, P] for mRoPE, else
    [B, P]), next_position [B] and, with images, the vision inputs and image_rows (pixel_values rows each)."""
    rows, vision = [], [im for im in images if im is not None]
    vision = [Image.open(im).convert("RGB") if isinstance(im, (str, Path)) else im for im in vision]
    family = family_of(image_processor, family) if vision else None
    pix = image_processor(images=vision, return_tensors="pt", **family["kwargs"]) if vision else {}
    per_image = iter(pix[family["per_image"]]) if vision else None
    img_id = tokenizer.convert_tokens_to_ids(family["image_token"]) if family else -1
    for question, image in zip(questions, images):
        content = question if image is None else [{"type": "image"}, {"type": "text", "text": question}]
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": content})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids, row_images = [], []
        for tok in tokenizer(text, add_special_tokens=False)["input_ids"]:
            if tok == img_id:                                                  # expand the placeholder
                row_images.append(next(per_image))
            ids += family["tokens"](row_images[-1], tokenizer, image_processor) if tok == img_id else [tok]
        pos = torch.arange(len(ids))[None]                                      # [1, L]
        if family and family["mrope"]:
            pos = qwen_mrope_positions(ids, img_id, row_images, image_processor.merge_size)  # [3, L]
        rows.append((ids, pos))
    input_ids = pad_sequence([torch.tensor(ids) for ids, _ in rows], True, tokenizer.pad_token_id, "left")
    attention_mask = pad_sequence([torch.ones(len(ids)).long() for ids, _ in rows], True, 0, "left")
    position_ids = pad_sequence([pos.T for _, pos in rows], True, 0, "left").permute(2, 0, 1).contiguous()
    out = dict(input_ids=input_ids, attention_mask=attention_mask,                # [B, P]
               mm_token_type_ids=(input_ids == img_id).long(),                 # 1 on image tokens (for HF)
               position_ids=position_ids if len(position_ids) == 3 else position_ids[0],  # [(3,) B, P]
               next_position=position_ids.amax((0, 2)) + 1)                     # [B]
    if vision:
        out.update({k: pix[k] for k in family["inputs"]})
        out["image_rows"] = torch.tensor([family["rows"](x) for x in pix[family["per_image"]]])  # [images]
    return out

def vision_inputs(prompts: dict) -> dict:
    """The model's image inputs among the prompt tensors (none for a text-only batch)."""
    return {k: v for k, v in prompts.items() if any(k in f["inputs"] for f in FAMILIES.values())}

def select_prompts(prompts: dict, index) -> dict:
    """The prompt rows `index` (a list or LongTensor; repeats allowed), with their images' pixel_values rows
    and per-image tensors (rows without an image contribute none), minus left-padding columns no row needs."""
    index = torch.as_tensor(index, dtype=torch.long)
    per_row = ("input_ids", "attention_mask", "mm_token_type_ids", "next_position")
    out = {k: prompts[k][index] for k in per_row}
    out["position_ids"] = prompts["position_ids"][..., index, :]
    if "pixel_values" in prompts:
        has_image = prompts["mm_token_type_ids"].any(1)                        # [B], an image per row at most
        image_of_row = has_image.long().cumsum(0) - 1                          # [B]
        images = image_of_row[index][has_image[index]]                         # the selected images, in order
        sizes = prompts["image_rows"]                                          # pixel_values rows per image
        starts = sizes.cumsum(0) - sizes
        if len(images):
            patch_rows = torch.cat([torch.arange(starts[i], starts[i] + sizes[i]) for i in images.tolist()])
            out["pixel_values"] = prompts["pixel_values"][patch_rows]
            out.update({k: prompts[k][images] for k in ("image_grid_thw", "image_rows") if k in prompts})
    first = int(out["attention_mask"].any(0).long().argmax())                  # first column some row uses
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "position_ids"):
        out[k] = out[k][..., first:]
    return out

def encode_responses(tokenizer, texts: list[str], max_new_tokens: int, eos_token_id) -> tuple:
    """Texts as (response_ids [N, T], response_mask [N, T], n_truncated): tokens + EOS, right-padded; one
    longer than max_new_tokens (EOS included) is cut there, has no EOS, and is counted."""
    eos = eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) else eos_token_id
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    n_truncated = sum(len(s) > max_new_tokens for s in seqs)
    seqs = [s[:max_new_tokens] for s in seqs]
    ids = pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], True, tokenizer.pad_token_id or 0)
    mask = pad_sequence([torch.ones(len(s), dtype=torch.bool) for s in seqs], True, False)   # [N, T]
    return ids, mask, n_truncated

# ---- The model, layer by layer -----------------------------------------------------------------------------
def text_model(model):
    """The decoder stack (embed_tokens, layers, norm, rotary_emb) of a VLM or of a text-only LLM."""
    return getattr(model.model, "language_model", model.model)

def placeholder_ids(model) -> list[int]:
    """Token ids the sampler never emits: the image / video placeholders (they break the vision forward)."""
    ids = (getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None))
    return [i for i in ids if i is not None]

def embed_prompts(model, prompts: dict) -> tuple[torch.Tensor, list]:
    """Token embeddings [B, P, d] with the vision features on the image tokens, and Qwen3-VL's DeepStack
    inputs: one (is_image [B, P], features [image tokens, d]) per early layer (add_deepstack), else []."""
    ids = prompts["input_ids"]
    x = text_model(model).embed_tokens(ids)                                   # [B, P, d]
    if "pixel_values" not in prompts:
        return x, []
    out = model.model.get_image_features(**vision_inputs(prompts))  # per image (Qwen) or tile (InternVL)
    feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in out.pooler_output])  # [image tokens, d]
    is_image = ids == model.config.image_token_id                             # [B, P]
    if feats.shape[0] != int(is_image.sum()):
        raise ValueError(f"{int(is_image.sum())} image tokens in the prompts but {feats.shape[0]} image "
                         "features: rollout.FAMILIES expands images differently from this checkpoint")
    deep = [torch.cat(f).to(x.device, x.dtype) for f in getattr(out, "deepstack_features", None) or []]
    return x.masked_scatter(is_image[..., None], feats.to(x.device, x.dtype)), [(is_image, f) for f in deep]

def add_deepstack(x, is_image, feats) -> torch.Tensor:
    """DeepStack (Qwen3-VL): features [image tokens, d] added to x [n, L, d] (as _deepstack_process does)."""
    is_image = is_image.to(x.device)
    x[is_image] = x[is_image] + feats.to(x.device)
    return x

def rope(x, cos, sin):
    """Rotary embedding (rotate-half convention); cos/sin [n, L, D] already hold the mRoPE sections."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]

def decoder_layer(layer, x, cos, sin, k_cache, v_cache, start: int, bias):
    """One decoder layer on x [n, L, d]: writes its keys/values into the cache at [start, start+L) and
    attends to the cache up to start+L under the additive `bias` [n, 1, L, start+L] (0 or -inf)."""
    attn, (n, L, _) = layer.self_attn, x.shape
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(n, L, -1, attn.head_dim)                          # [n, L, Hq, D]
    k = attn.k_proj(h).view(n, L, -1, attn.head_dim)                          # [n, L, Hkv, D]
    if hasattr(attn, "q_norm"):                                # Qwen3(-VL): an RMSNorm per head, before RoPE
        q = attn.q_norm(q)
        k = attn.k_norm(k)
    q = rope(q.transpose(1, 2), cos, sin)                                     # [n, Hq, L, D]
    k_cache[:, :, start:start + L] = rope(k.transpose(1, 2), cos, sin)        # [n, Hkv, L, D]
    v_cache[:, :, start:start + L] = attn.v_proj(h).view(n, L, -1, attn.head_dim).transpose(1, 2)
    k, v = k_cache[:, :, :start + L], v_cache[:, :, :start + L]
    if L == 1:  # decoding: a KV head's Hq/Hkv query heads act as its queries (no repeated K/V; faster on CPU)
        o = F.scaled_dot_product_attention(q.view(n, k.shape[1], -1, attn.head_dim), k, v, attn_mask=bias,
                                           scale=attn.scaling)               # [n, Hkv, Hq/Hkv, D]
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scaling,
                                           enable_gqa=True).transpose(1, 2)  # [n, L, Hq, D]
    x = x + attn.o_proj(o.reshape(n, L, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))

def forward(model, x, cos, sin, k, v, start: int, bias, deepstack=()) -> torch.Tensor:
    """Float32 logits [n, V] of x's [n, L, d] last position, through all layers with rotary cos/sin [n, L, D],
    caches k, v ([n, Hkv, S, D] per layer, on its device: device_map works) and `deepstack` (prefill only)."""
    lm, device = text_model(model), x.device
    for i, (layer, kc, vc) in enumerate(zip(lm.layers, k, v)):
        d = kc.device                                                         # (.to is a no-op on one device)
        x = decoder_layer(layer, x.to(d), cos.to(d), sin.to(d), kc, vc, start, bias.to(d))
        if i < len(deepstack):
            x = add_deepstack(x, *deepstack[i])
    x = lm.norm(x[:, -1].to(lm.norm.weight.device))
    return model.lm_head(x.to(model.lm_head.weight.device)).float().to(device)

# ---- Cache handling ----------------------------------------------------------------------------------------
def allocate_cache(model, n: int, length: int, dtype) -> tuple[list, list]:
    """Empty K and V caches, one [n, Hkv, length, D] per layer on that layer's device, filled in place."""
    lm = text_model(model)
    shape = (n, lm.config.num_key_value_heads, length, lm.layers[0].self_attn.head_dim)
    devices = [layer.input_layernorm.weight.device for layer in lm.layers]
    return ([torch.empty(shape, dtype=dtype, device=d) for d in devices],
            [torch.empty(shape, dtype=dtype, device=d) for d in devices])

def share_prefill(k, v, num_samples: int, P: int):
    """Copy the prompt's keys/values from sample 0 of each group (the prefill's) to samples 1..G-1."""
    for c in k + v:
        g = c[:, :, :P].unflatten(0, (-1, num_samples))                        # [B, G, Hkv, P, D] (a view)
        g[:, 1:] = g[:, :1]

DROP_EVERY = 8  # ended rows leave the batch together, once they are 1/DROP_EVERY of it (see generate)

def drop_rows(keep, k, v, *rows):
    """Remove ended rows from the caches and from every per-row tensor (dim 0). Returns them in order."""
    return ([c[keep.to(c.device)] for c in k], [c[keep.to(c.device)] for c in v], *(r[keep] for r in rows))

@contextmanager
def unsharded(model):
    """FSDP2 model unsharded for the whole block: one all-gather per module, none per token; else a no-op."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    states = [m._get_fsdp_state() for m in mods]
    saved = [(s._auto_reshard_after_forward, [g.post_forward_mesh_info for g in s._fsdp_param_groups])
             for s in states]
    if states:
        states[0]._lazy_init()  # as the root's first forward would (else inner modules act as roots)
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)                   # forwards inside must not reshard
        m.unshard()
    try:
        yield model
    finally:
        for m, s, (auto, infos) in zip(mods, states, saved):
            s._auto_reshard_after_forward = auto                               # restore exactly what was set
            for g, info in zip(s._fsdp_param_groups, infos):
                g.post_forward_mesh_info = info
            m.reshard()

# ---- Sampling (transformers' processors, same order: repetition penalty, temperature, top-k, top-p) --------
def process_logits(logits, seen, *, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, banned=()):
    """Processed float32 scores [n, V] from logits [n, V]; `seen` [n, V] marks prompt and generated tokens."""
    x = logits.float()
    if repetition_penalty != 1.0:                                         # divide positive, multiply negative
        x = torch.where(seen, torch.where(x < 0, x * repetition_penalty, x / repetition_penalty), x)
    if len(banned):
        x[:, list(banned)] = -float("inf")
    if temperature > 0 and temperature != 1.0:
        x = x / temperature
    if temperature > 0 and top_k > 0:                                         # keep the k largest (ties kept)
        x = x.masked_fill(x < x.topk(min(top_k, x.shape[-1])).values[:, -1:], -float("inf"))
    if temperature > 0 and top_p < 1.0:                                   # drop the tail of mass <= 1 - top_p
        sorted_x, order = x.sort(-1)
        remove = sorted_x.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[:, -1] = False                                                 # keep at least one token
        x = x.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return x

def sample_next(logits, seen, *, temperature, top_k, top_p, repetition_penalty, banned, generator):
    """Next token per row [n]: argmax when temperature == 0, else a draw from softmax(processed scores). With
    top_k > 0, temperature, top-p and the draw run over the k best tokens only (the same distribution, no sort
    over V); a tie at the k-th place (top-k then keeps more than k) takes the full-vocabulary path."""
    x = process_logits(logits, seen, repetition_penalty=repetition_penalty, banned=banned)  # [n, V]
    if temperature == 0:
        return x.argmax(-1)
    knobs = dict(temperature=temperature, top_p=top_p)
    if 0 < top_k < x.shape[-1]:
        cand, idx = x.topk(top_k + 1)                                         # [n, k+1], best first
        if not (cand[:, top_k] == cand[:, top_k - 1]).any():
            probs = process_logits(cand[:, :top_k], None, **knobs).softmax(-1)  # [n, k]
            return idx.gather(1, torch.multinomial(probs, 1, generator=generator)).squeeze(1)
    probs = process_logits(x, None, top_k=top_k, **knobs).softmax(-1)         # [n, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)

# ---- Generation --------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    response_ids: torch.Tensor   # [B*G, T] long; row b*G + j is sample j of prompt b; pad after the end
    response_mask: torch.Tensor  # [B*G, T] bool; True up to and including the first EOS

def eos_list(model, eos_token_id) -> list[int]:
    """The stop tokens: eos_token_id (int or list), or the model's generation_config when None."""
    eos = model.generation_config.eos_token_id if eos_token_id is None else eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

@torch.no_grad()
def generate(model, prompts: dict, *, max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, eos_token_id=None,
             pad_token_id: int = 0, generator: torch.Generator | None = None) -> Rollout:
    """Sample `num_samples` responses per prompt with a hand-written KV cache. temperature=0 is greedy.
    eos_token_id=None uses model.generation_config.eos_token_id; pass [] to never stop early."""
    knobs = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                 banned=placeholder_ids(model), generator=generator)
    ids, G, lm = prompts["input_ids"], num_samples, text_model(model)
    (B, P), n, device = ids.shape, ids.shape[0] * num_samples, ids.device
    eos = torch.tensor(eos_list(model, eos_token_id), dtype=torch.long, device=device)
    was_training = model.training  # eval mode while sampling: no dropout, no gradient-checkpointing wrappers
    with unsharded(model.eval()):
        # 1. prefill each prompt once, into sample 0 of its group, under an additive bias: -inf on prompt pads
        # (the decoding steps' too), causal, and every pad sees itself
        x, deepstack = embed_prompts(model, prompts)                          # [B, P, d]
        k, v = allocate_cache(model, n, P + max_new_tokens, x.dtype)
        bias = torch.zeros(n, P + max_new_tokens, dtype=x.dtype, device=device)
        bias[:, :P].masked_fill_(~prompts["attention_mask"].bool().repeat_interleave(G, 0), -float("inf"))
        causal = torch.full((P, P), -float("inf"), dtype=x.dtype, device=device).triu(1)
        prefill_bias = bias[::G, None, None, :P] + causal
        prefill_bias.diagonal(dim1=-2, dim2=-1).zero_()                       # [B, 1, P, P]
        cos, sin = lm.rotary_emb(x, prompts["position_ids"])                  # [B, P, D]
        logits = forward(model, x, cos, sin, [c[::G] for c in k], [c[::G] for c in v], 0, prefill_bias,
                         deepstack)                                           # [B, V]
        # 2. copy the prompt's cache to its G samples
        share_prefill(k, v, G, P)
        logits = logits.repeat_interleave(G, 0)                               # [n, V]
        seen = torch.zeros(n, logits.shape[-1], device=device)                # [n, V] prompt tokens, not pads
        seen = seen.scatter_add_(1, ids.repeat_interleave(G, 0), (bias[:, :P] == 0).float()) > 0
        next_pos = prompts["next_position"].to(device).repeat_interleave(G)   # [n]
        table_pos = torch.arange(int(next_pos.max()) + max_new_tokens, device=device)[None]
        cos_table, sin_table = (c[0] for c in lm.rotary_emb(x, table_pos))    # [positions, D]: 1-D from here
        rows = torch.arange(n, device=device)                                 # original row of each batch row
        done = torch.zeros(n, dtype=torch.bool, device=device)                # ended, still in the batch
        out = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        for t in range(max_new_tokens):
            # 3. decode one token per row per step
            tok = sample_next(logits, seen, **knobs)                          # [m]
            out[rows, t] = tok                                              # (masked to pad below once ended)
            lengths[rows] += ~done
            done |= torch.isin(tok, eos)
            if t == max_new_tokens - 1 or done.all():
                break
            # 4. drop finished rows, together: a drop copies the cache, a finished row costs one row a step
            if int(done.sum()) * DROP_EVERY >= len(done):
                k, v, rows, tok, seen, bias, next_pos, done = drop_rows(~done, k, v, rows, tok, seen, bias,
                                                                        next_pos, done)
            seen.scatter_(1, tok[:, None], True)
            pos = next_pos + t                                                # [m]
            x = lm.embed_tokens(tok)[:, None]                                 # [m, 1, d]
            logits = forward(model, x, cos_table[pos, None], sin_table[pos, None], k, v, P + t,
                             bias[:, None, None, :P + t + 1])                 # [m, V]
    model.train(was_training)
    T = int(lengths.max())
    mask = torch.arange(T, device=device) < lengths[:, None]                 # [n, T]
    return Rollout(out[:, :T].masked_fill(~mask, pad_token_id), mask)

# ---- Teacher-forced log-probs ------------------------------------------------------------------------------
def packed_mask(segment: torch.Tensor) -> torch.Tensor:
    """Attention [B, 1, L, L] (True = may attend) inside packed rows [prompt | response 1 | ... | padding],
    from each position's segment [B, L]: 0 a prompt token, j a token of response j, -1 padding. A position
    sees the earlier prompt tokens and its own response's, never another response; a pad sees only itself.
    For example, packed_mask(torch.tensor([[-1, 0, 0, 1, 1, 2]]))[0, 0].long() is

        tensor([[1, 0, 0, 0, 0, 0],        # the pad: only itself
                [0, 1, 0, 0, 0, 0],        # the prompt: causal
                [0, 1, 1, 0, 0, 0],
                [0, 1, 1, 1, 0, 0],        # response 1: the prompt and itself
                [0, 1, 1, 1, 1, 0],
                [0, 1, 1, 0, 0, 1]])       # response 2: the prompt and itself, not response 1
    """
    L = segment.shape[1]
    pos = torch.arange(L, device=segment.device)
    q, k = segment[:, :, None], segment[:, None, :]                          # [B, L, 1], [B, 1, L]
    allowed = (pos[None, :] <= pos[:, None]) & ((k == q) | (k == 0)) & (k >= 0)  # [B, L, L]
    return (allowed | torch.eye(L, dtype=torch.bool, device=segment.device))[:, None]

def response_logprobs(model, prompts: dict, response_ids, response_mask, temperature: float = 1.0,
                      return_entropy: bool = False):
    """log pi(token) [N, T] under softmax(logits / temperature), teacher-forced through the model's own
    forward with `generate`'s positions; 0 where the mask is False. `prompts` has N rows, or N/k (response n
    belongs to prompt n // k): each prompt runs once, packed with its k responses (`packed_mask`; the model
    also gets `packed_layout`, which attention.block_attention uses to skip the masked blocks). With
    return_entropy, also each position's exact entropy [N, T]. Differentiable (no torch.no_grad() inside)."""
    N, T = response_ids.shape
    (B, P), dev = prompts["input_ids"].shape, response_ids.device
    assert N % B == 0, f"{N} responses for {B} prompts: need N or N/k prompt rows"
    k, pos, steps = N // B, prompts["position_ids"], torch.arange(T, device=dev)
    length = response_mask.sum(1)                                               # [N]
    assert (response_mask == (steps < length[:, None])).all(), "masks must be prefixes"
    assert prompts["attention_mask"][:, -1].all(), "prompts must be left-padded (encode_prompts)"
    # a packed row per prompt: the prompt once, then its k responses' tokens, no padding between them
    per_row = length.view(B, k)                                                 # [B, k]
    start = (per_row.cumsum(1) - per_row).view(N)                               # [N] offset after the prompt
    L = P + int(per_row.sum(1).max())
    row_of = torch.arange(N, device=dev) // k                                   # [N] each response's row
    cols = (P + start[:, None] + steps).clamp(max=L - 1)                        # [N, T] each token's column
    n, t = response_mask.nonzero(as_tuple=True)                                 # the real response tokens
    b, col = row_of[n], cols[n, t]
    ids = prompts["input_ids"].new_zeros(B, L)                                  # [B, L]
    ids[:, :P], ids[b, col] = prompts["input_ids"], response_ids[n, t]
    segment = torch.full((B, L), -1, device=dev)                                # [B, L]
    segment[:, :P] = prompts["attention_mask"].long() - 1                       # 0 prompt token, -1 padding
    segment[b, col] = n % k + 1
    packed_pos = pos.new_zeros(*pos.shape[:-1], L)                              # [(3,) B, L]
    packed_pos[..., :P], packed_pos[..., b, col] = pos, prompts["next_position"][b] + t  # generate's
    out = model(input_ids=ids, attention_mask=packed_mask(segment), position_ids=packed_pos, use_cache=False,
                logits_to_keep=L - P + 1, packed_layout=(P, row_of, cols, response_mask),  # (attention.py)
                **vision_inputs(prompts)).logits                                # [B, L-P+1, V] from P-1 on
    at = cols - P                               # token t > 0 is predicted at index start + t (column - P)...
    at[:, 0] = 0                                 # ... token 0 at the prompt's last position (index 0)
    logits = out[row_of[:, None], at]                                           # [N, T, V]
    # The sampler's support (no placeholder_ids), so no update moves probability onto them; no top-k, top-p or
    # penalty: truncation changes with the context, and pi_theta / pi_old would compare different supports.
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[placeholder_ids(model)] = True                                       # [V]
    logp = (logits.float() / temperature).masked_fill(banned, -float("inf")).log_softmax(-1)  # [N, T, V]
    token_logp = logp.gather(-1, response_ids[..., None]).squeeze(-1)           # [N, T]
    token_logp = token_logp.masked_fill(~response_mask, 0.0)
    if not return_entropy:
        return token_logp
    entropy = -(logp.exp() * logp.masked_fill(banned, 0.0)).sum(-1)             # [N, T]
    return token_logp, entropy.masked_fill(~response_mask, 0.0)

"""Block attention for packed rows, as a transformers attention function: the policy update's log-probs
(rollout.response_logprobs) and the discriminator's packed forward (Discriminator.packed_forward).

Both pack a shared start with the sequences that follow it: [prompt | response 1 | ... | padding] or
[D's prompt start | response 1 | ...], under a mask where the start is causal on itself and each sequence sees
the start and, causally, itself, never another sequence (rollout.packed_mask). Dense masked attention over
such a row costs O((P + k T)^2) per head, most of it masked out; `block_attention` computes the same
attention block by block, O(P^2 + k T (P + T)): the start on itself, then every sequence on [start | itself].
On the default run's policy update it makes the log-probs' forward and backward 1.44x faster, D's packed
update 1.57x (`python bench.py --what logprobs` / `--what disc`, docs/performance.md).

    import attention
    attention.use_block_attention(model)   # once, after loading; the vision tower keeps its own attention
    logp = rollout.response_logprobs(model, prompts, ids, mask)                 # same values, less time

The packing code passes `packed_layout` to the model's forward; transformers hands it to the attention
function of every decoder layer, and any other function (sdpa, eager) ignores it, so a model that was not
switched computes the same values densely. The choice lives on the model (its LM config), not around the
call, so that gradient checkpointing, which runs a layer's forward again inside backward, recomputes the
same function. Imports nothing from the project.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "rollout_block"
# discriminator.packed_forward's packed rows' length under block attention: a micro-batch of the embedded
# run's responses in one row, the prompt's start once (the dense mask still passed along: 4096^2 bools, 16 MB)
PACK_TOKENS = 4096


def block_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                    packed_layout=None, **kwargs):
    """The attention function: query [B, H, L, D], key / value [B, Hkv, L, D], attention_mask
    rollout.packed_mask's [B, 1, L, L]; returns ([B, L, H, D], None) as transformers' own functions do.
    packed_layout = (P, row_of [N], cols [N, T], valid [N, T]): the prompt is columns [0, P) of every row,
    response n's T tokens are columns cols[n] of row row_of[n], valid[n] marks its real tokens. Without
    packed_layout: transformers' sdpa. Padding columns after the responses get 0 (nothing attends to them;
    their logits are never read)."""
    if packed_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    P, row_of, cols, valid = packed_layout
    (B, H, L, D), T = query.shape, cols.shape[1]
    if query.device.type != "cpu":  # CUDA's memory-efficient kernel takes a mask, not grouped KV heads
        key, value = (x.repeat_interleave(H // x.shape[1], 1) for x in (key, value))

    def sdpa(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                              enable_gqa=True)

    def gather(x):                                                              # [N, H (or Hkv), T, D]
        return x.transpose(1, 2)[row_of[:, None], cols].transpose(1, 2)

    out = query.new_zeros(B, L, H, D)
    # 1. the prompt on itself, under the mask's [P, P] corner (causal; a left pad sees only itself)
    prompt = sdpa(query[:, :, :P], key[:, :, :P], value[:, :, :P], attention_mask[:, :, :P, :P])
    out[:, :P] = prompt.transpose(1, 2)
    # 2. each response on [its prompt's real tokens | itself, causally]; the prompt's last position is real
    # (left padding), so its mask row marks exactly the prompt's real tokens
    causal = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()
    mask = torch.cat([attention_mask[row_of, :, P - 1:P, :P].expand(-1, -1, T, -1),
                      causal & valid[:, None, None, :]], -1)                      # [N, 1, T, P + T]
    o = sdpa(gather(query), torch.cat([key[row_of, :, :P], gather(key)], 2),
             torch.cat([value[row_of, :, :P], gather(value)], 2), mask)          # [N, H, T, D]
    # 3. the real tokens' outputs back to their columns (a padding position of a response is dropped)
    out[row_of[:, None].expand_as(cols)[valid], cols[valid]] = o.transpose(1, 2)[valid]
    return out, None


AttentionInterface.register(NAME, block_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)   # 2-D masks (model.generate, unpacked calls) as under sdpa


def use_block_attention(model):
    """Switch a model's decoder layers to block_attention: a VLM's language model (its vision tower keeps its
    own attention), a causal LM's, or a discriminator's backbone. Returns the model."""
    lm = getattr(model, "backbone", model)                                      # discriminator.Discriminator
    lm = getattr(lm, "model", lm)                                               # past an LM head
    config = getattr(lm, "language_model", lm).config                          # past a vision tower
    if getattr(config, "sub_configs", None):  # setting it here would switch the vision tower too
        raise ValueError(f"use_block_attention: no language model found in {type(model).__name__}")
    config._attn_implementation = NAME
    return model

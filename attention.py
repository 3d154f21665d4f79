"""Block attention for the packed rows of rollout.response_logprobs, as a transformers attention function.

response_logprobs runs each prompt once, packed with its k responses: [prompt | response 1 | ... | padding],
under rollout.packed_mask (the prompt causal on itself, each response on the prompt and causally on itself,
never on another response). Dense masked attention over such a row costs O((P + k T)^2) per head; most of
that square is masked out. `block_attention` computes the same attention block by block, O(P^2 + k T (P + T)):
the prompt on itself, then every response on [the prompt | itself]. For the marked world's policy update
(8 responses of ~82 tokens behind a 50-token prompt) that makes a forward and backward ~1.5x faster
(docs/performance.md; `python bench.py --what attention`).

    import attention
    attention.use_block_attention(model)   # once, after loading; the vision tower keeps its own attention
    logp = rollout.response_logprobs(model, prompts, ids, mask)                 # same values, less time

response_logprobs passes `packed_layout` to the model's forward; transformers hands it to the attention
function of every decoder layer, and any other function (sdpa, eager) ignores it, so a model that was not
switched computes the same log-probs densely. The choice lives on the model (its LM config), not around the
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
    """Switch the model's decoder layers (a VLM's language model, or a text-only LLM's) to block_attention;
    the vision tower keeps its own. Returns the model."""
    lm = getattr(model.model, "language_model", model.model) if hasattr(model, "model") else model
    lm.config._attn_implementation = NAME
    return model

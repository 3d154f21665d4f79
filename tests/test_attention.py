"""attention.block_attention against dense masked attention over the whole packed row (rollout.packed_mask):
on random tensors with grouped KV heads, left-padded prompts and responses of uneven length, gradients
included; through the tiny student's own forward, with and without activation checkpointing."""
import copy
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

import attention
import rollout as R

pytestmark = pytest.mark.usefixtures("one_thread")


def packed_layout(lengths, prompt_mask, extra: int):
    """The layout response_logprobs builds, for response lengths [B, k] behind prompts (mask [B, P]), with
    `extra` padding columns after the longest row: (segment [B, L], (P, row_of, cols, valid))."""
    (B, k), P = lengths.shape, prompt_mask.shape[1]
    N, T = B * k, int(lengths.max())
    valid = torch.arange(T) < lengths.view(N, 1)                                # [N, T]
    start = (lengths.cumsum(1) - lengths).view(N)
    L = P + int(lengths.sum(1).max()) + extra
    cols = (P + start[:, None] + torch.arange(T)).clamp(max=L - 1)              # [N, T]
    row_of = torch.arange(N) // k
    segment = torch.full((B, L), -1)
    segment[:, :P] = prompt_mask - 1
    n, t = valid.nonzero(as_tuple=True)
    segment[row_of[n], cols[n, t]] = n % k + 1
    return segment, (P, row_of, cols, valid)


def test_block_attention_equals_dense_masked_attention():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D, P = 3, 4, 2, 8, 6
    lengths = torch.tensor([[5, 1, 3], [2, 2, 2], [7, 4, 1]])                   # one-token responses too
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0                                                      # left padding
    prompt_mask[2, :5] = 0                                                      # a one-token prompt
    segment, layout = packed_layout(lengths, prompt_mask, extra=2)
    L = segment.shape[1]
    mask = R.packed_mask(segment)                                               # [B, 1, L, L]
    q, k, v = (torch.randn(B, h, L, D, generator=g, requires_grad=True) for h in (H, Hkv, Hkv))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    block, none = attention.block_attention(torch.nn.Module(), q, k, v, mask, packed_layout=layout)
    assert none is None and block.shape == dense.shape == (B, L, H, D)
    used = (segment >= 0) | (torch.arange(L) < P)                               # [B, L] prompt and responses
    torch.testing.assert_close(block[used], dense[used], atol=1e-6, rtol=0)
    assert (block[~used] == 0).all()                                            # the trailing padding
    w = torch.randn(int(used.sum()), H, D, generator=g)
    grads = [torch.autograd.grad((out[used] * w).sum(), (q, k, v)) for out in (dense, block)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@contextmanager
def counting_calls():
    """attention.block_attention's calls inside the block: one entry per call, True when it was given a
    packed_layout (the blocks), False for a call that fell back to sdpa."""
    calls, original = [], attention.block_attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("packed_layout") is not None)
        return original(*args, **kwargs)
    attention.AttentionInterface.register(attention.NAME, counted)
    try:
        yield calls
    finally:
        attention.AttentionInterface.register(attention.NAME, original)


@pytest.fixture(scope="module")
def student(tiny_student):
    model = AutoModelForImageTextToText.from_pretrained(tiny_student).eval()
    tok, ip = AutoTokenizer.from_pretrained(tiny_student), AutoImageProcessor.from_pretrained(tiny_student)
    return model, tok, ip


def logprobs_and_grads(model, prompts, ids, mask, weights):
    model.zero_grad()
    logp = R.response_logprobs(model, prompts, ids, mask)
    (logp * weights).sum().backward()
    return logp.detach(), {n: w.grad.clone() for n, w in model.named_parameters() if w.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_models_forward_on_block_attention_matches_sdpa(student, batch, checkpointing):
    """The same log-probs and gradients as the model left on sdpa (dense masked attention); with activation
    checkpointing the recomputed forward in backward runs block attention again (a mismatch would fail)."""
    model, tok, ip = student
    p = R.encode_prompts(tok, ip, *batch)
    out = R.generate(model, p, max_new_tokens=12, num_samples=3, temperature=1.0,
                     generator=torch.Generator().manual_seed(0), eos_token_id=[])
    mask = out.response_mask.clone()
    mask[1, 7:] = False                                                         # uneven lengths
    mask[5, 2:] = False
    ids = out.response_ids.masked_fill(~mask, 0)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    block = attention.use_block_attention(copy.deepcopy(model)).train()
    assert R.text_model(block).config._attn_implementation == attention.NAME
    assert block.config.vision_config._attn_implementation == model.config.vision_config._attn_implementation
    if checkpointing:
        block.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with counting_calls() as calls:
        ref_logp, ref_grads = logprobs_and_grads(copy.deepcopy(model).train(), p, ids, mask, weights)
        logp, grads = logprobs_and_grads(block, p, ids, mask, weights)
    layers = model.config.text_config.num_hidden_layers
    assert calls == [True] * layers * (2 if checkpointing else 1)            # forward (+ recomputed)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        scale = ref_grads[n].abs().max().item()
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5 * scale, rtol=0, msg=n)


def test_use_block_attention_switches_the_language_model_only(student):
    model = attention.use_block_attention(copy.deepcopy(student[0]))
    assert model.config.text_config._attn_implementation == attention.NAME
    assert model.config.vision_config._attn_implementation != attention.NAME
    composite = SimpleNamespace(model=SimpleNamespace(config=copy.deepcopy(model.config)))  # no LM inside
    with pytest.raises(ValueError, match="no language model"):
        attention.use_block_attention(composite)

"""rollout.py against transformers: greedy decoding, teacher-forced log-probs, sampling knobs, masks,
helpers."""
import copy
import inspect

import pytest
import torch
from transformers import (AutoImageProcessor, AutoTokenizer, LogitsProcessorList,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration,
                          RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

import rollout as R


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def student(tiny_student):
    tok = AutoTokenizer.from_pretrained(tiny_student)
    ip = AutoImageProcessor.from_pretrained(tiny_student)
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_student).eval(), tok, ip


@pytest.fixture(scope="module")
def qwen2vl(tiny_qwen2vl):
    """A second architecture and size: Qwen2-VL, 2 layers, 96 wide, 3 heads / 1 KV head, other mRoPE sections
    (tests/tiny_checkpoints.py)."""
    tok = AutoTokenizer.from_pretrained(tiny_qwen2vl)
    ip = AutoImageProcessor.from_pretrained(tiny_qwen2vl)
    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2vl).eval(), tok, ip


def hf_generate(model, prompts, **kw):
    """transformers' generate on the same tensors (Qwen: with mm_token_type_ids, so it uses real 3-D
    positions)."""
    mm = ({"mm_token_type_ids": prompts["mm_token_type_ids"]}
          if "mm_token_type_ids" in inspect.signature(model.forward).parameters else {})
    out = model.generate(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
                         pad_token_id=0, suppress_tokens=R.placeholder_ids(model), **mm,
                         **R.vision_inputs(prompts), **kw)
    return out[:, prompts["input_ids"].shape[1]:]


def test_positions_match_get_rope_index(student, batch):
    model, tok, ip = student
    p = R.encode_prompts(tok, ip, *batch)
    pos, deltas = model.model.get_rope_index(p["input_ids"], p["mm_token_type_ids"], p["image_grid_thw"],
                                             attention_mask=p["attention_mask"])
    m = p["attention_mask"].bool()
    assert torch.equal(p["position_ids"][:, m], pos[:, m])
    assert torch.equal(p["next_position"], deltas[:, 0] + m.sum(1))
    assert (p["mm_token_type_ids"].sum(1) == torch.tensor([9, 8, 0, 6])).all()


def check_greedy_equals_transformers(model, tok, ip, batch):
    """Greedy `generate` = transformers' greedy `generate`, token for token, with and without a repetition
    penalty, with rows that end early at an EOS."""
    p = R.encode_prompts(tok, ip, *batch, system="Answer briefly.")
    for kw in (dict(), dict(repetition_penalty=1.3)):  # the penalty: random-weight greedy repeats itself less
        free = R.generate(model, p, max_new_tokens=12, temperature=0, eos_token_id=[], **kw)
        eos = int(free.response_ids[0, 4])                       # a token row 0 emits: rows end early
        ours = R.generate(model, p, max_new_tokens=12, temperature=0, eos_token_id=eos, **kw)
        theirs = hf_generate(model, p, max_new_tokens=12, do_sample=False, eos_token_id=eos, **kw)
        assert torch.equal(ours.response_ids, theirs), (ours.response_ids, theirs)
        assert ours.response_mask.sum(1).min() < 12


@pytest.mark.parametrize("which", ["student", "qwen2vl"])
def test_greedy_equals_transformers(which, request, batch):
    check_greedy_equals_transformers(*request.getfixturevalue(which), batch)


@pytest.mark.parametrize("which", ["student", "qwen2vl"])
def test_response_logprobs_match_unpadded_forward(which, request, batch):
    model, tok, ip = request.getfixturevalue(which)
    p = R.encode_prompts(tok, ip, *batch)
    g = torch.Generator().manual_seed(0)
    out = R.generate(model, p, max_new_tokens=10, num_samples=2, top_k=50, top_p=0.95,
                     repetition_penalty=1.05, temperature=1.0, generator=g, eos_token_id=[])
    mask = out.response_mask.clone()
    mask[1, 6:] = False                                          # a shorter response, right-padded
    ids = out.response_ids.masked_fill(~mask, 0)
    # N/k prompt rows
    logp, ent = R.response_logprobs(model, p, ids, mask, temperature=0.7, return_entropy=True)
    expanded = R.select_prompts(p, torch.arange(8) // 2)        # N prompt rows: no shared prefix
    torch.testing.assert_close(logp, R.response_logprobs(model, expanded, ids, mask, 0.7), atol=1e-5, rtol=0)
    for n in range(8):
        b, L = n // 2, int(mask[n].sum())
        keep = p["attention_mask"][b].bool()
        seq = torch.cat([p["input_ids"][b, keep], ids[n, :L]])[None]
        one = R.select_prompts(p, [b])
        vision = {k: one[k] for k in ("pixel_values", "image_grid_thw") if k in one}
        mm = (seq == model.config.image_token_id).long()
        logits = model(input_ids=seq, mm_token_type_ids=mm, **vision).logits
        scores = logits[0, -L - 1:-1].float() / 0.7                # [L, V]
        scores[:, R.placeholder_ids(model)] = -float("inf")         # not scored: the sampler never draws it
        ref = scores.log_softmax(-1)
        torch.testing.assert_close(logp[n, :L], ref.gather(-1, ids[n, :L, None])[:, 0], atol=1e-4, rtol=0)
        torch.testing.assert_close(ent[n, :L], -(ref.exp() * ref.clamp(min=-1e30)).sum(-1), atol=1e-4, rtol=0)
        assert (logp[n, L:] == 0).all() and (ent[n, L:] == 0).all()
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for prompts in (p, expanded):                                # the gradient reaches the shared prompt too
        model.zero_grad()
        (R.response_logprobs(model, prompts, ids, mask) * weights).sum().backward()
        grads.append({n: w.grad.clone() for n, w in model.named_parameters() if w.grad is not None})
    assert grads[0].keys() == grads[1].keys() and model.lm_head.weight.grad.abs().sum() > 0
    assert any("visual" in n for n in grads[0])                  # ... down into the vision tower
    for n in grads[0]:
        scale = grads[1][n].abs().max().item()                  # float32 sums in another order: relative
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5 * scale, rtol=0, msg=n)


def test_sampling_knobs_match_transformers_processors():
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    ids = torch.randint(0, 300, (6, 20))
    seen = torch.zeros(6, 300, dtype=torch.bool).scatter_(1, ids, True)
    cases = [(dict(repetition_penalty=1.3), [RepetitionPenaltyLogitsProcessor(1.3)]),
             (dict(temperature=0.6), [TemperatureLogitsWarper(0.6)]),
             (dict(top_k=7), [TopKLogitsWarper(7)]),
             (dict(top_p=0.8), [TopPLogitsWarper(0.8)]),
             (dict(repetition_penalty=1.05, temperature=1.0, top_k=50, top_p=0.95),
              [RepetitionPenaltyLogitsProcessor(1.05), TopKLogitsWarper(50), TopPLogitsWarper(0.95)])]
    for ours, theirs in cases:
        expect = LogitsProcessorList(theirs)(ids, logits.clone())
        assert torch.equal(R.process_logits(logits, seen, **ours), expect), ours
    banned = R.process_logits(logits, seen, banned=[3, 5])
    assert banned[:, [3, 5]].eq(-float("inf")).all() and torch.equal(banned[:, 6:], logits[:, 6:])


@pytest.mark.parametrize("tie", [False, True])
def test_sampler_draws_from_the_processed_distribution(tie):
    """sample_next (top-k first, then temperature / top-p / the draw over the k candidates; a tie at the k-th
    place takes the full-vocabulary path) draws from softmax(process_logits(...)): the processors'
    distribution."""
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    ids = torch.randint(0, 300, (4, 20))
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter_(1, ids, True)
    kw = dict(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3, banned=[3, 5])
    if tie:                                                      # rank 20 ties rank 19: top-k keeps 21 tokens
        kw.update(repetition_penalty=1.0, top_p=1.0, banned=[])
        order = logits.argsort(-1, descending=True)
        logits[0, order[0, 20]] = logits[0, order[0, 19]]
    expect = R.process_logits(logits, seen, **kw).softmax(-1)   # [4, V]
    N = 50_000
    tok = R.sample_next(logits.repeat_interleave(N, 0), seen.repeat_interleave(N, 0),
                        generator=torch.Generator().manual_seed(0), **kw)   # N draws per row
    freq = torch.zeros(4, 300).index_put_((torch.arange(4).repeat_interleave(N), tok), torch.ones(4 * N),
                                          accumulate=True) / N         # [4, V]
    assert (freq[expect == 0] == 0).all()                        # nothing outside the processed support
    support = (expect > 0).sum(1)
    if tie:
        assert support.tolist() == [21, 20, 20, 20]
    else:
        assert (support <= 20).all() and (support < 20).any()  # top-p cut
    if tie:
        assert freq[0, order[0, 19]] > 0 and freq[0, order[0, 20]] > 0  # both tied tokens drawn
    torch.testing.assert_close(freq, expect, atol=0.01, rtol=0)  # ~5 standard deviations at the largest p


def test_sampling_is_reproducible_with_a_generator(student, batch):
    model, tok, ip = student
    p = R.encode_prompts(tok, ip, *batch)
    kw = dict(max_new_tokens=8, num_samples=3, top_k=50, top_p=0.95, eos_token_id=[])
    a = R.generate(model, p, generator=torch.Generator().manual_seed(3), **kw)
    b = R.generate(model, p, generator=torch.Generator().manual_seed(3), **kw)
    c = R.generate(model, p, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)
    assert a.response_ids.shape == (12, 8)


def test_early_end_padding_masks_and_no_placeholders(student, batch):
    model, tok, ip = student
    model = copy.deepcopy(model)
    bias = torch.zeros(model.lm_head.out_features)
    bias[R.placeholder_ids(model)] = 50.0                        # the model now prefers placeholder tokens
    model.lm_head.bias = torch.nn.Parameter(bias)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model.lm_head.bias.data[eos] = 4.0                           # and ends often
    p = R.encode_prompts(tok, ip, *batch)
    out = R.generate(model, p, max_new_tokens=16, num_samples=4, pad_token_id=7,
                     generator=torch.Generator().manual_seed(0))  # eos from generation_config
    ids, mask = out.response_ids, out.response_mask
    assert ids.shape == mask.shape and ids.shape[0] == 16 and ids.shape[1] <= 16
    assert not torch.isin(ids, torch.tensor(R.placeholder_ids(model))).any()
    lengths = mask.sum(1)
    assert torch.equal(mask, torch.arange(ids.shape[1]) < lengths[:, None])  # a prefix
    assert (ids[~mask] == 7).all()
    for row, L in zip(ids, lengths.tolist()):
        assert (row[:L - 1] != eos).all()                        # nothing after the first EOS
        assert row[L - 1] == eos or L == 16
    assert (lengths < 16).sum() >= 4 and (lengths == 1).sum() < 16


def test_select_prompts_matches_encoding_those_rows(student, batch):
    model, tok, ip = student
    qs, ims = batch
    p = R.encode_prompts(tok, ip, qs, ims)
    for index in ([3, 0], [2], [1, 2, 1]):
        sel = R.select_prompts(p, torch.tensor(index))
        direct = R.encode_prompts(tok, ip, [qs[i] for i in index], [ims[i] for i in index])
        for k in direct:
            got = sel[k] if not (k == "position_ids" and direct[k].dim() == 2) else sel[k][0]
            assert torch.equal(got, direct[k]), (index, k)
        assert set(sel) == set(direct)


def test_encode_responses_appends_eos_pads_and_counts_truncation(student):
    _, tok, _ = student
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    long = "Step 1: the objects. I see a red circle at left. " * 5
    ids, mask, n_trunc = R.encode_responses(tok, ["The answer is \\boxed{2}.", long], 20, eos)
    n0 = len(tok("The answer is \\boxed{2}.", add_special_tokens=False)["input_ids"])
    assert ids.shape == (2, 20) and n_trunc == 1
    assert ids[0, n0] == eos and mask[0].sum() == n0 + 1 and (ids[0, n0 + 1:] == tok.pad_token_id).all()
    assert mask[1].all() and (ids[1] != eos).all()
    assert tok.decode(ids[0, :n0]) == "The answer is \\boxed{2}."

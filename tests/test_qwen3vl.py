"""Qwen3-VL specifics (the family-wide paths run in tests/test_families.py): DeepStack in the hand-written
decode loop, positions equal to the model's own get_rope_index, the family chosen by config.model_type, and
Qwen3-VL-MoE as a teacher (greedy equal to transformers, a teacher cache filled with it, refused as a student
by ril.py)."""
import copy
import json
import os

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

import ril
import rollout as R
from data import teacher_cache
from data.dataset import load_jsonl
from tests.test_rollout import check_greedy_equals_transformers, hf_generate

pytestmark = pytest.mark.usefixtures("one_thread")


def load(path):
    return (AutoModelForImageTextToText.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path),
            AutoImageProcessor.from_pretrained(path))


@pytest.fixture(scope="module")
def dense(tiny_qwen3vl):
    return load(tiny_qwen3vl)


@pytest.fixture(scope="module")
def moe(tiny_qwen3vl_moe):
    return load(tiny_qwen3vl_moe)


def test_positions_match_get_rope_index(dense, batch):
    """Image tokens at 32 px each (16 px patches, 2 x 2 merge); 3-D positions and the first response position
    as Qwen3VLModel.get_rope_index computes them."""
    model, tok, ip = dense
    p = R.encode_prompts(tok, ip, *batch, family="qwen3_vl")
    assert p["mm_token_type_ids"].sum(1).tolist() == [9, 8, 0, 6]        # resized to 96x96, 128x64, -, 64x96
    pos, deltas = model.model.get_rope_index(p["input_ids"], p["mm_token_type_ids"], p["image_grid_thw"],
                                             attention_mask=p["attention_mask"])
    m = p["attention_mask"].bool()
    assert torch.equal(p["position_ids"][:, m], pos[:, m])
    assert torch.equal(p["next_position"], deltas[:, 0] + m.sum(1))


def test_family_is_chosen_by_model_type(dense, batch):
    """Qwen3-VL ships Qwen2-VL's image processor class: the model type names the family, an unknown or
    mismatched one fails with a message, and the image-processor fallback encodes what the model type does."""
    _, tok, ip = dense
    by_type = R.encode_prompts(tok, ip, *batch, family="qwen3_vl")
    fallback = R.encode_prompts(tok, ip, *batch)
    assert all(torch.equal(by_type[k], fallback[k]) for k in by_type)
    with pytest.raises(ValueError, match="no rollout family for model_type 'llava'"):
        R.encode_prompts(tok, ip, *batch, family="llava")
    with pytest.raises(ValueError, match="internvl ships GotOcr2ImageProcessor"):
        R.encode_prompts(tok, ip, *batch, family="internvl")
    text_only = R.encode_prompts(tok, ip, ["1 + 1?"], [None], family="anything")  # no image: no family needed
    assert text_only["position_ids"].dim() == 2


def test_deepstack_is_applied_in_prefill(dense, batch, monkeypatch):
    """DeepStack matters on this checkpoint (zeroing its features changes transformers' greedy output on the
    rows with an image), rollout.generate matches the model with it, and without add_deepstack it would match
    only the zeroed model: the test that fails if the decode loop drops the features."""
    model, tok, ip = dense
    config = model.config
    assert len(config.vision_config.deepstack_visual_indexes) == 2 < config.text_config.num_hidden_layers
    p = R.encode_prompts(tok, ip, *batch, family="qwen3_vl")
    _, deepstack = R.embed_prompts(model, p)
    assert len(deepstack) == 2 and all(f.shape == (23, 64) and m.sum() == 23 for m, f in deepstack)
    zeroed = copy.deepcopy(model)
    for merger in zeroed.model.visual.deepstack_merger_list:  # DeepStack features = 0, the rest unchanged
        torch.nn.init.zeros_(merger.linear_fc2.weight)
        torch.nn.init.zeros_(merger.linear_fc2.bias)
    kw = dict(max_new_tokens=12, eos_token_id=[])
    theirs = hf_generate(model, p, do_sample=False, **kw)
    theirs_zeroed = hf_generate(zeroed, p, do_sample=False, **kw)
    has_image = p["mm_token_type_ids"].any(1)
    assert (theirs != theirs_zeroed).any(1).tolist() == has_image.tolist()
    assert torch.equal(R.generate(model, p, temperature=0, **kw).response_ids, theirs)
    monkeypatch.setattr(R, "add_deepstack", lambda x, is_image, feats: x)
    dropped = R.generate(model, p, temperature=0, **kw).response_ids
    assert torch.equal(dropped, theirs_zeroed) and not torch.equal(dropped, theirs)


def test_qk_norm_is_applied(dense, batch, monkeypatch):
    """Qwen3's attention normalises q and k per head before RoPE; the decode loop without it departs from
    transformers (greedy equality in tests/test_families.py holds only with it)."""
    model, tok, ip = dense
    p = R.encode_prompts(tok, ip, *batch, family="qwen3_vl")
    theirs = hf_generate(model, p, do_sample=False, max_new_tokens=8, eos_token_id=[])
    for layer in R.text_model(model).layers:
        monkeypatch.delattr(layer.self_attn, "q_norm")   # rollout then skips q/k norms (transformers ran)
    ours = R.generate(model, p, temperature=0, max_new_tokens=8, eos_token_id=[]).response_ids
    assert not torch.equal(ours, theirs)


def test_moe_teacher_greedy_equals_transformers(moe, batch):
    model, tok, ip = moe
    mlp = R.text_model(model).layers[0].mlp
    assert type(mlp).__name__ == "Qwen3VLMoeTextSparseMoeBlock" and model.config.text_config.num_experts == 4
    assert sum(p.numel() for p in model.parameters()) < 1.5e6
    check_greedy_equals_transformers(model, tok, ip, batch)


def test_teacher_cache_with_the_moe_teacher(embedded, tiny_qwen3vl_moe, tmp_path):
    rows = [json.loads(line) for line in open(embedded / "val.jsonl")][:6]
    for r in rows:
        r["image"] = os.path.relpath(embedded / r["image"], tmp_path)
    rows[2]["image"] = None                                      # a text-only question
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = teacher_cache.main(["--data", str(data), "--teacher", f"moe={tiny_qwen3vl_moe}", "-n", "3",
                                "--batch-size", "4", "--max-new-tokens", "8"])
    assert stats["moe"]["questions"] == 6 and stats["moe"]["responses"] == 18
    cached = load_jsonl(data)
    assert all(len(r["teachers"]["moe"]) == 3 for r in cached)
    assert not all(len(set(r["teachers"]["moe"])) == 1 for r in cached)  # sampled, not greedy


def test_ril_refuses_an_moe_student(tiny_qwen3vl_moe, embedded):
    with pytest.raises(SystemExit, match="training an MoE student is not supported"):
        ril.parse_config(["--student", str(tiny_qwen3vl_moe), "--data", str(embedded / "train.jsonl")])

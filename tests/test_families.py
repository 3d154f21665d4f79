"""Every student family through every path: Qwen2.5-VL (the tiny student), Qwen2-VL, InternVL3 and Qwen3-VL
(tiny checkpoints laid out like the hub's, tests/tiny_checkpoints.py). Prompts against each checkpoint's own
processor, greedy `rollout.generate` against transformers, log-probs against each sequence run alone, the
discriminator built from each student, and the SFT, discriminator and RL stages of ril.py under torchrun with
2 processes."""
import copy
import inspect
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, InternVLProcessor,
                          ProcessorMixin, Qwen2VLProcessor, Qwen3VLProcessor)

import attention
import rollout as R
from discriminator import Discriminator, p_student
from tests.test_rollout import check_greedy_equals_transformers
from tests.test_ril import run

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> (checkpoint fixture, model class, image processor class, the processor transformers pairs with)
FAMILIES = {"qwen2_5_vl": ("tiny_student", "Qwen2_5_VLForConditionalGeneration", "Qwen2VLImageProcessorPil",
                           Qwen2VLProcessor),
            "qwen2_vl": ("tiny_qwen2vl", "Qwen2VLForConditionalGeneration", "Qwen2VLImageProcessorPil",
                         Qwen2VLProcessor),
            "internvl": ("tiny_internvl", "InternVLForConditionalGeneration", "GotOcr2ImageProcessorPil",
                         InternVLProcessor),
            "qwen3_vl": ("tiny_qwen3vl", "Qwen3VLForConditionalGeneration", "Qwen2VLImageProcessorPil",
                         Qwen3VLProcessor)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def student(request):
    """A checkpoint loaded the way ril.py loads a student: the Auto classes, by path."""
    path = request.getfixturevalue(FAMILIES[request.param][0])
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ip = AutoImageProcessor.from_pretrained(path)
    return SimpleNamespace(name=request.param, path=path, model=model, tok=tok, ip=ip)


def test_loads_through_the_auto_classes_without_torchvision(student):
    _, model_class, processor_class, _ = FAMILIES[student.name]
    assert type(student.model).__name__ == model_class and type(student.ip).__name__ == processor_class
    assert sum(p.numel() for p in student.model.parameters()) < 1.5e6
    image_token = R.family_of(student.ip)["image_token"]
    assert student.tok.chat_template
    assert student.tok.convert_tokens_to_ids(image_token) == student.model.config.image_token_id


def test_prompts_equal_the_checkpoints_own_processor(student, batch, monkeypatch):
    """encode_prompts gives, row by row, the input_ids and pixel_values of transformers' processor for the
    family (InternVL: <img> + <IMG_CONTEXT> x image_seq_length per tile + </img>, tiles from
    crop_to_patches)."""
    # the processors want a video processor, which needs torchvision: build them without one
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    kw = dict(image_seq_length=student.model.config.image_seq_length) if student.name == "internvl" else {}
    proc = FAMILIES[student.name][3](image_processor=student.ip, tokenizer=student.tok, video_processor=None,
                                     chat_template=student.tok.chat_template, **kw)
    questions, images = batch
    p = R.encode_prompts(student.tok, student.ip, questions, images, family=student.model.config.model_type)
    for b, (question, image) in enumerate(zip(questions, images)):
        content = question if image is None else [{"type": "image"}, {"type": "text", "text": question}]
        text = student.tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
        theirs = proc(text=[text], images=None if image is None else [image], return_tensors="pt")
        ours = R.select_prompts(p, [b])
        assert torch.equal(ours["input_ids"], theirs["input_ids"]), (student.name, b)
        for k in ("pixel_values", "image_grid_thw"):
            assert (k in ours) == (k in theirs) and (k not in ours or torch.equal(ours[k], theirs[k])), (b, k)
        if "mm_token_type_ids" in theirs:                        # Qwen3VLProcessor: 1 on image tokens
            assert torch.equal(ours["mm_token_type_ids"], theirs["mm_token_type_ids"]), b
    if student.name == "internvl":
        assert p["image_rows"].tolist() == [5, 3, 3]
        assert p["mm_token_type_ids"].sum(1).tolist() == [20, 12, 0, 12]
        assert p["position_ids"].dim() == 2                      # 1-D positions
    else:
        assert p["position_ids"].shape[0] == 3                   # 3-D mRoPE


def test_greedy_equals_transformers(student, batch):
    check_greedy_equals_transformers(student.model, student.tok, student.ip, batch)


def test_response_logprobs_equal_each_sequence_alone(student, batch):
    model, tok, ip = student.model, student.tok, student.ip
    p = R.encode_prompts(tok, ip, *batch)
    out = R.generate(model, p, max_new_tokens=10, num_samples=2, top_k=50, top_p=0.95,
                     repetition_penalty=1.05, temperature=1.0, generator=torch.Generator().manual_seed(0),
                     eos_token_id=[])
    mask = out.response_mask.clone()
    mask[1, 6:] = False                                          # a shorter response, right-padded
    ids = out.response_ids.masked_fill(~mask, 0)
    logp = R.response_logprobs(model, p, ids, mask)              # [8, T], N/k prompt rows
    block = attention.use_block_attention(copy.deepcopy(model))  # as ril.py loads it (distributed.py)
    torch.testing.assert_close(R.response_logprobs(block, p, ids, mask), logp, atol=1e-5, rtol=0)
    for n in range(8):
        b, L = n // 2, int(mask[n].sum())
        one = R.select_prompts(p, [b])                           # the prompt alone, unpadded
        seq = torch.cat([one["input_ids"][0], ids[n, :L]])[None]
        mm = ({"mm_token_type_ids": (seq == model.config.image_token_id).long()}
              if "mm_token_type_ids" in inspect.signature(model.forward).parameters else {})
        logits = model(input_ids=seq, **mm, **R.vision_inputs(one)).logits
        scores = logits[0, -L - 1:-1].float()                    # [L, V]
        scores[:, R.placeholder_ids(model)] = -float("inf")      # never drawn, never scored
        ref = scores.log_softmax(-1)
        torch.testing.assert_close(logp[n, :L], ref.gather(-1, ids[n, :L, None])[:, 0], atol=1e-4, rtol=0)
        assert (logp[n, L:] == 0).all()


def test_discriminator_from_the_student(student, tmp_path):
    """D's backbone is the student's language model (vision tower dropped), weights copied; it saves and
    reloads."""
    disc = Discriminator.from_student(student.path).eval()
    lm = R.text_model(student.model)
    assert type(disc.backbone).__name__ == type(lm).__name__
    assert torch.equal(disc.backbone.embed_tokens.weight, lm.embed_tokens.weight)
    assert torch.equal(disc.backbone.layers[-1].mlp.down_proj.weight, lm.layers[-1].mlp.down_proj.weight)
    texts = ["The answer is \\boxed{2}.", "Step 1: I see a red circle. The answer is \\boxed{yes}."]
    torch.nn.init.normal_(disc.head.weight, std=0.1)
    p = p_student(disc, student.tok, texts)
    assert p.shape == (2,) and torch.isfinite(p).all() and p[0] != p[1]
    disc.save_pretrained(tmp_path / "d")
    reloaded = Discriminator.from_pretrained(tmp_path / "d").eval()
    torch.testing.assert_close(p_student(reloaded, student.tok, texts), p)


@pytest.mark.parametrize("name", ["qwen2_vl", "internvl", "qwen3_vl"])  # Qwen2.5-VL: tests/test_ril.py
def test_sft_disc_and_rl_stages_under_torchrun(name, request, embedded, tmp_path):
    """SFT, then the discriminator pre-trained from the SFT student and 2 RIL steps, each with 2 processes."""
    path = request.getfixturevalue(FAMILIES[name][0])
    # 64 new tokens hold a whole teacher response (~50 tokens, its answer last): teachers then earn the
    # answer reward and the untrained students do not, so every group has non-zero advantages and RL moves
    # the weights
    small = ["--out-dir", tmp_path, "--max-new-tokens", 64, "--max-disc-len", 192, "--micro-batch", 8,
             "--sample-every", 0]
    run(["--student", path, "--stage", "sft", "--sft-data", embedded / "sft.jsonl", "--sft-steps", 2,
         "--sft-batch-size", 4, "--sft-lr", 1e-3, "--name", "sft", *small], nproc=2)
    sft = tmp_path / "sft" / "sft"
    run(["--student", sft, "--data", embedded / "train.jsonl", "--eval-data", embedded / "val.jsonl",
         "--eval-limit", 4, "--steps", 2, "--batch-size", 4, "--group-size", 2, "--lr", 1e-3,
         "--disc-lr", 1e-3, "--disc-steps", 2, "--disc-questions", 8, "--disc-samples", 1,
         "--disc-batch-size", 8, "--name", "rl", *small], nproc=2)
    start = load_file(str(path / "model.safetensors"))
    sft_w = load_file(str(sft / "model.safetensors"))
    final = tmp_path / "rl" / "checkpoints" / "step-2" / "student"
    end = load_file(str(final / "model.safetensors"))
    assert any(not torch.equal(start[k], sft_w[k]) for k in start)
    assert any(not torch.equal(sft_w[k], end[k]) for k in end)
    assert type(AutoModelForImageTextToText.from_pretrained(final)).__name__ == FAMILIES[name][1]
    assert type(AutoImageProcessor.from_pretrained(final)).__name__ == FAMILIES[name][2]
    assert (tmp_path / "rl" / "discriminator" / "discriminator_head.safetensors").exists()
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    assert summary["skipped_steps"] == 0
    assert summary["val"]["final"]["n"] == 4 and "blind" in summary["val"]["final"]
    metrics = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["reward/teacher_answer"] > 0 for m in metrics)

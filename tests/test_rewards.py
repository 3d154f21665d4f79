"""rewards.py: answer extraction and checking, the judge's parsing and plumbing, r_sim, and R."""
import time

import pytest
import torch

import rewards
from rewards import (answer_reward, combine_rewards, extract_answer, judge_prompt, judge_rewards,
                     parse_judge_score, rule_rewards, similarity_reward)

# (response, ground truth, expected reward) -- every rule of answer_reward, one row per case.
CASES = [
    # extraction order: \boxed, then <answer>, then "answer is"
    (r"So the answer is \boxed{2}.", "2", 1.0),
    (r"Final answer: \boxed{blue}", "blue", 1.0),
    (r"First \boxed{3}, then on reflection \boxed{4}.", "4", 1.0),                 # the last box wins
    (r"First \boxed{3}, then on reflection \boxed{4}.", "3", 0.0),
    (r"The result is $\boxed{\frac{1}{2}}$.", "1/2", 1.0),                        # \boxed inside $...$
    (r"\boxed{\text{yes}}", "yes", 1.0),                                          # nested braces, \text
    (r"\boxed{\left(B\right)}", "B", 1.0),                                        # \left / \right
    (r"<answer> 7 </answer>", "7", 1.0),
    (r"<answer>5</answer> no wait <answer>6</answer>", "6", 1.0),                 # the last tag wins
    (r"<answer>1</answer> but \boxed{2}", "2", 1.0),                              # \boxed before <answer>
    ("I think the answer is 12.", "12", 1.0),
    ("The answer is: yes", "yes", 1.0),
    ("The answer is 3. Then I stop.", "3", 1.0),                                  # up to the sentence end
    ("Answer is 5 and the answer is 6", "6", 1.0),                                # the last "answer is"
    ("I have no idea.", "3", 0.0),                                                # nothing extracted
    ("", "3", 0.0),
    (r"\boxed{}", "3", 0.0),                                                      # empty box
    # normalisation
    (r"\boxed{ Blue }", "blue", 1.0),                                             # whitespace, case
    (r"\boxed{$42$}", "42", 1.0),                                                 # dollars
    (r"\boxed{YES.}", "yes", 1.0),                                                # trailing period
    (r"\boxed{\text{red}}", r"\text{Red}", 1.0),
    (r"\boxed{red}", "green", 0.0),
    # numbers as numbers
    (r"\boxed{2.50}", "2.5", 1.0),
    (r"\boxed{2.5}", "5/2", 1.0),
    (r"\boxed{\dfrac{3}{4}}", "0.75", 1.0),
    (r"\boxed{\frac{6}{8}}", r"\frac{3}{4}", 1.0),
    (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0),
    (r"\boxed{1,234}", "1234", 1.0),                                              # thousands separators
    (r"\boxed{1,234,567.0}", "1234567", 1.0),
    (r"\boxed{.5}", "0.5", 1.0),
    (r"\boxed{7}", "7.0", 1.0),
    (r"\boxed{33}", "3", 0.0),                                                    # never a substring match
    (r"\boxed{3}", "33", 0.0),
    (r"\boxed{3 apples}", "3", 0.0),
    (r"\boxed{1 2}", "12", 0.0),                                                  # a space is not a separator
    (r"\boxed{12,34}", "1234", 0.0),                                              # not a thousands grouping
    (r"\boxed{1/0}", "1/0", 1.0),                                                 # same string, no crash
    (r"\boxed{1/0}", "0", 0.0),
    # multiple choice
    (r"\boxed{B}", "B", 1.0),
    (r"\boxed{(B)}", "B", 1.0),
    (r"\boxed{B.}", "B", 1.0),
    (r"\boxed{(B) 5 objects}", "B", 1.0),
    ("The answer is (C) because there are four.", "C", 1.0),
    (r"\boxed{B}", "(B)", 1.0),
    (r"\boxed{b}", "B", 1.0),
    (r"\boxed{C}", "B", 0.0),
    (r"\boxed{(C) B}", "B", 0.0),
    (r"\boxed{A red circle}", "A", 0.0),                                          # a word, not a letter
    # adversarial but well-formed
    (r"\boxed{\boxed{5}}", "5", 1.0),
    ("}}}} \\boxed{4} {{{{", "4", 1.0),                                           # stray braces around a box
    ("\\boxed{4} then \\boxed{5", "4", 1.0),                                      # unclosed last: falls back
    (r"<answer>9", "9", 0.0),                                                     # unclosed tag, no fallback
]


@pytest.mark.parametrize("response,answer,expected", CASES)
def test_answer_reward_table(response, answer, expected):
    assert answer_reward(response, answer) == expected


def test_table_is_large_enough():
    assert len(CASES) >= 40


def test_extract_answer_values():
    assert extract_answer(r"x \boxed{a{b}c} y") == "a{b}c"
    assert extract_answer(r"\boxed {12}") == "12"
    assert extract_answer("<ANSWER>B</ANSWER>") == "B"
    assert extract_answer("the answer is") is None
    assert extract_answer(None) is None


ADVERSARIAL = {
    "a million characters": "x" * 1_000_000 + r" \boxed{7}",
    "a million characters, no answer": "word " * 200_000,
    "20k unclosed braces": "{" * 20_000 + "answer is 7",
    "20k unclosed boxes": "\\boxed{" * 20_000,
    "20k unclosed boxes then a box": "\\boxed{" * 20_000 + "\\boxed{7}",
    "20k closing braces": "}" * 20_000 + "\\boxed{7}",
    "deep nesting": "\\boxed{" * 10_000 + "7" + "}" * 10_000,
    "20k answer tags": "<answer>" * 20_000 + "7</answer>",
    "20k answer-is": "the answer is " * 20_000 + "7",
    "spaces after boxed": "\\boxed" + " " * 500_000,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_inputs_are_fast_and_never_raise(name):
    text = ADVERSARIAL[name]
    t0 = time.perf_counter()
    pred = extract_answer(text)
    r = answer_reward(text, "7")
    elapsed = time.perf_counter() - t0
    assert r in (0.0, 1.0) and (pred is None or isinstance(pred, str))
    assert elapsed < 0.5, f"{name}: {elapsed:.3f}s"


def test_adversarial_answers():
    assert answer_reward(ADVERSARIAL["a million characters"], "7") == 1.0
    assert answer_reward(ADVERSARIAL["20k unclosed boxes then a box"], "7") == 1.0
    assert answer_reward(ADVERSARIAL["deep nesting"], "7") == 1.0
    assert answer_reward(ADVERSARIAL["20k unclosed braces"], "7") == 1.0


def test_numbers_past_pythons_digit_limit_never_raise():
    """int() refuses strings of more than 4,300 digits: such numbers, in a response or a ground truth, are
    compared as text (equal strings match, anything else does not) instead of killing the run."""
    big = "9" * 5000
    assert answer_reward(f"so \\boxed{{{big}}}", big) == 1.0
    assert answer_reward(f"\\boxed{{{big}}}", "3") == 0.0 and answer_reward("\\boxed{3}", big) == 0.0
    assert answer_reward(f"\\boxed{{{big}/7}}", f"{big}/7") == 1.0
    assert answer_reward(f"\\boxed{{1{big}}}", big) == 0.0


def test_rule_rewards_batch():
    r, stats = rule_rewards([r"\boxed{1}", "no answer", r"\boxed{2}"], ["1", "1", "3"])
    assert r.tolist() == [1.0, 0.0, 0.0] and stats["n_no_answer"] == 1 and stats["n"] == 3


# -----------------------------------------------------------------------------
# The judge

@pytest.mark.parametrize("text,score", [
    ("The response says 3, which matches. <answer>1</answer>", 1.0),
    ("Wrong colour. <answer>0</answer>", 0.0),
    ("<answer> 1 </answer>", 1.0),
    ("<ANSWER>0</ANSWER>", 0.0),
    ("format: <answer>1</answer> ... final verdict <answer>0</answer>", 0.0),  # several tags: the last wins
    ("<answer>0</answer> on reflection <answer>1</answer>", 1.0),
    ("The answer is correct.", None),                                          # missing tags
    ("<answer>1", None),                                                       # unclosed
    ("1</answer>", None),
    ("<answer></answer>", None),
    ("<answer>1.0</answer>", None),                                            # not a clean 0 or 1
    ("<answer>yes</answer>", None),
    ("<answer>0 or 1</answer>", None),
    ("<answer>10</answer>", None),
    ("<answer>1</answer> and then <answer>maybe</answer>", None),
    ("", None),
    ("\x00\ufffd garbage }{ <answer", None),
    (None, None),
])
def test_parse_judge_score(text, score):
    assert parse_judge_score(text) == score


def test_judge_prompt_holds_question_truth_and_response():
    p = judge_prompt("How many red circles?", "2", r"I count two. \boxed{2}")
    assert "How many red circles?" in p and "Correct answer:\n2" in p and r"\boxed{2}" in p
    assert "<answer>0</answer>" in p and "<answer>1</answer>" in p
    assert "<answer>" in rewards.JUDGE_SYSTEM


class _ScriptedJudge(torch.nn.Module):
    """A judge whose `generate` appends scripted verdicts and records what it was given."""

    def __init__(self, tok, verdicts):
        super().__init__()
        self.tok, self.verdicts, self.batches = tok, iter(verdicts), []
        self.generation_config = type("G", (), {"eos_token_id": tok.eos_token_id})()

    def generate(self, input_ids, attention_mask, generation_config):
        assert not generation_config.do_sample                                  # greedy
        assert (attention_mask[:, -1] == 1).all()                  # left-padded: rows end together
        self.batches.append([self.tok.decode(row[m.bool()]) for row, m in zip(input_ids, attention_mask)])
        new = [self.tok(next(self.verdicts), add_special_tokens=False)["input_ids"] for _ in input_ids]
        T = max(len(n) for n in new) + 2
        out = torch.full((len(new), T), self.tok.pad_token_id)
        for r, n in enumerate(new):
            out[r, :len(n)] = torch.tensor(n)
        return torch.cat([input_ids, out], 1)


def test_judge_rewards_with_scripted_verdicts(tiny_student):
    """The judge's plumbing (prompting, batching, decoding, parsing, stats) with a scripted generate."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_student)
    model = _ScriptedJudge(tok, ["right <answer>1</answer>", "wrong <answer>0</answer>", "garbage",
                                 "<answer>2</answer>", "ok <answer>1</answer>"])
    scores, stats = judge_rewards(model, tok, ["q"] * 5, ["a"] * 5, ["r"] * 4 + ["x" * 50], batch_size=2,
                                  max_response_chars=20)
    assert scores.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert stats["n_unparsable"] == 2 and stats["n_truncated"] == 1 and stats["n"] == 5
    assert [len(b) for b in model.batches] == [2, 2, 1]
    prompts = [p for b in model.batches for p in b]
    assert all(rewards.JUDGE_SYSTEM in p for p in prompts)                       # the system message
    assert "x" * 20 in prompts[4] and "x" * 21 not in prompts[4]                 # cut from the left


@pytest.fixture(scope="module")
def tiny_judge(tiny_student, tmp_path_factory):
    """A random tiny text-only Qwen2 causal LM with the student's tokenizer: a judge that answers garbage."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_student)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    path = tmp_path_factory.mktemp("judge") / "tiny-judge"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_judge_rewards_end_to_end(tiny_judge):
    """transformers' generate over a tiny random judge: garbage verdicts score 0 and are counted, no
    exception."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_judge).eval()
    tok = AutoTokenizer.from_pretrained(tiny_judge)
    qs = ["How many red objects are there?", "What color is the largest object?",
          "Is the red circle left of it?"]
    scores, stats = judge_rewards(model, tok, qs, ["2", "blue", "yes"], [r"\boxed{2}", r"\boxed{red}", "no"],
                                  max_new_tokens=12, batch_size=2)
    assert scores.shape == (3,) and set(scores.tolist()) <= {0.0, 1.0}
    assert stats["n"] == 3 and stats["n_unparsable"] == 3 and scores.tolist() == [0.0, 0.0, 0.0]


# -----------------------------------------------------------------------------
# r_sim and R

def test_similarity_reward():
    p = torch.tensor([0.1, 0.49, 0.5, 0.9])
    assert similarity_reward(p).tolist() == [1.0, 1.0, 0.0, 0.0]  # 1[p < 0.5]
    assert torch.allclose(similarity_reward(p, "continuous"), 1 - p)
    with pytest.raises(ValueError):
        similarity_reward(p, "three-level")


def test_combine_rewards():
    r_sim = torch.tensor([1.0, 0.0, 1.0, 0.0])
    r_ans = torch.tensor([1.0, 1.0, 0.0, 0.0])
    R, parts = combine_rewards(r_sim, r_ans)
    assert R.tolist() == [2.0, 1.0, 1.0, 0.0] and parts["r_sim"] is r_sim and parts["r_ans"] is r_ans
    R, _ = combine_rewards(r_sim, r_ans, w_sim=0.5, w_ans=2.0)
    assert R.tolist() == [2.5, 2.0, 0.5, 0.0]
    R, parts = combine_rewards(None, r_ans)  # RL only
    assert R.tolist() == r_ans.tolist() and parts["r_sim"] is None
    R, _ = combine_rewards(r_sim, None)  # similarity only
    assert R.tolist() == r_sim.tolist()
    with pytest.raises(ValueError):
        combine_rewards(None, None)

"""Rewards: RIL's R = r_sim + r_ans (Algorithm 2, step 4).

- r_ans, the answer reward, two ways:
  * rule-based: `extract_answer` then `answer_reward` (normalised string / number / choice-letter match);
    the embedded default, since the embedded task has short verifiable answers;
  * the paper's LLM judge: a text-only causal LM reads the question, the ground truth and the response,
    writes a short explanation and then the score inside <answer></answer> (`judge_rewards`).
- r_sim, the similarity reward: 1[D(o) < 0.5], "the discriminator thinks a teacher wrote this".
- `combine_rewards`: R = w_sim * r_sim + w_ans * r_ans (the paper: no weights, R in {0, 1, 2}).
"""
from __future__ import annotations

import logging
import re
from fractions import Fraction

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

log = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# Answer extraction

_BRACES = re.compile(r"\\boxed\s*\{|\{|\}")  # the only characters the \boxed scan looks at


def _last_boxed(text: str) -> str | None:
    """Content of the last-opened closed \\boxed{...}, braces balanced. One pass with a stack: linear time."""
    stack, best = [], None  # stack of (is_boxed, content start, open position)
    for m in _BRACES.finditer(text):
        tok = m.group()
        if tok == "}":
            if stack:
                boxed, start, opened = stack.pop()
                if boxed and (best is None or opened > best[0]):
                    best = (opened, text[start:m.start()])
        else:
            stack.append((tok != "{", m.end(), m.start()))
    return None if best is None else best[1]


def _last_answer_tag(text: str) -> str | None:
    """Content of the last <answer>...</answer> (case-insensitive), or None."""
    low = text.lower()
    end = low.rfind("</answer>")
    start = low.rfind("<answer>", 0, end) if end >= 0 else -1
    return None if start < 0 else text[start + len("<answer>"):end]


def _after_answer_is(text: str) -> str | None:
    """What follows the last "answer is", up to the end of that line or sentence, or None."""
    at = text.lower().rfind("answer is")
    if at < 0:
        return None
    rest = text[at + len("answer is"):].split("\n", 1)[0]
    rest = re.split(r"\.\s", rest, maxsplit=1)[0]  # "is 3. Then ..." -> "3"; "is 2.5" stays whole
    return rest.strip().lstrip(":").strip() or None


def extract_answer(text: str) -> str | None:
    """The final answer in a response: last \\boxed{...}, else last <answer>...</answer>, else after the
    last "answer is", else None. Linear in len(text); never raises on a string."""
    if not isinstance(text, str):
        return None
    for find in (_last_boxed, _last_answer_tag, _after_answer_is):
        found = find(text)
        if found is not None and found.strip():
            return found.strip()
    return None


# -----------------------------------------------------------------------------
# Rule-based answer check

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(-?\d+)\s*\}$")
_NUMBER = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?$")  # 12, -3.5, .5, 1,234,567.8
_SLASH = re.compile(r"^([-+]?\d+)\s*/\s*([-+]?\d+)$")
_CHOICE = re.compile(r"^\(?([a-z])\)?(?:[.:)]|$)|^\(([a-z])\)")  # b, (b), b., b), b:, (b) text, b. text


def normalize(s: str) -> str:
    """Lower-case, no $, no \\text{}, no \\left/\\right, no LaTeX spacing, no trailing period, one-space
    runs."""
    s = s.replace("$", "")
    for _ in range(3):  # nested \text{\textbf{x}}
        s = _TEXT_CMD.sub(r"\1", s)
    s = re.sub(r"\\(?:left|right)\b", "", s)
    s = re.sub(r"\\[,;:! ]", " ", s)
    s = " ".join(s.split()).lower()
    return s.rstrip(".").strip()


MAX_DIGITS = 4000  # under Python's int-string limit (4,300 digits): longer numbers are compared as text


def parse_number(s: str) -> Fraction | None:
    """A normalised string as an exact number: 12, -3.5, 2.50, 1,234, 3/4, \\frac{3}{4}, \\dfrac{3}{4}; else
    None. More than MAX_DIGITS digits: None (Python refuses to parse such integers; compared as text)."""
    if sum(c.isdigit() for c in s) > MAX_DIGITS:
        return None
    m = _FRAC.match(s) or _SLASH.match(s)
    if m:
        sign, num, den = m.group(1, 2, 3) if m.re is _FRAC else ("", *m.group(1, 2))
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign == "-" else value
    if not _NUMBER.match(s) or not any(c.isdigit() for c in s):
        return None
    return Fraction(s.replace(",", "").lstrip("+"))


def choice_letter(s: str) -> str | None:
    """The option letter of a normalised multiple-choice answer: "b", "(b)", "b.", "(b) some text" -> "b"."""
    m = _CHOICE.match(s)
    return None if m is None else (m.group(1) or m.group(2))


def answers_match(pred: str, truth: str) -> bool:
    """Rule-based equality of an extracted answer and the ground truth (after `normalize`)."""
    pred = normalize(pred)
    truth = normalize(truth)
    if not pred or not truth:
        return False
    if pred == truth:
        return True
    p_num = parse_number(pred)
    t_num = parse_number(truth)
    if p_num is not None and t_num is not None:
        return p_num == t_num  # as numbers: 2.50 == 2.5, 1/2 == 0.5; never a substring (33 != 3)
    t_letter = choice_letter(truth)
    if t_letter is not None and len(truth.strip("().")) == 1:  # the truth is a bare option letter
        return choice_letter(pred) == t_letter
    return False


def answer_reward(response: str, answer: str) -> float:
    """Rule-based r_ans in {0.0, 1.0}: the extracted answer equals the ground truth. No answer gives 0."""
    pred = extract_answer(response)
    return float(pred is not None and answers_match(pred, answer))


def rule_rewards(responses: list[str], answers: list[str]) -> tuple[torch.Tensor, dict]:
    """`answer_reward` over a batch, with the same return shape as `judge_rewards` (--answer-reward rule)."""
    preds = [extract_answer(r) for r in responses]
    r = torch.tensor([float(p is not None and answers_match(p, a)) for p, a in zip(preds, answers)])  # [N]
    return r, {"n": len(r), "n_no_answer": sum(p is None for p in preds),
               "mean": r.mean().item() if len(r) else 0.0}


# -----------------------------------------------------------------------------
# The LLM-judge answer reward (the paper's r_ans)

JUDGE_SYSTEM = (
    "You are a strict grader. You are given a question, its correct answer, and a response to grade. "
    "Decide whether the final answer in the response means the same as the correct answer; ignore the "
    "style and length of the reasoning. First explain your decision in one or two sentences, then write "
    "the score inside <answer></answer>: <answer>1</answer> if the final answer is correct, "
    "<answer>0</answer> if it is wrong or missing.")


def judge_prompt(question: str, answer: str, response: str) -> str:
    """The user message the judge grades (the system message is JUDGE_SYSTEM)."""
    return (f"Question:\n{question}\n\nCorrect answer:\n{answer}\n\n"
            f"Response to grade:\n<response>\n{response}\n</response>\n\n"
            "Explain briefly, then give the score as <answer>0</answer> or <answer>1</answer>.")


def parse_judge_score(text: str) -> float | None:
    """The judge's score: the last <answer>...</answer> holding exactly 0 or 1 -> 0.0 / 1.0; anything else
    (no tag, an unclosed tag, "1.0", "yes", "0 or 1") -> None. Decision: when a judge writes several tags,
    the last one wins, since the score comes after the explanation."""
    content = _last_answer_tag(text) if isinstance(text, str) else None
    if content is None:
        return None
    content = content.strip()
    return float(content) if content in ("0", "1") else None


def load_judge(path: str, device: torch.device) -> tuple:
    """(model, tokenizer) of a text-only judge LLM checkpoint, for inference: bf16 on GPUs, fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def judge_rewards(model, tokenizer, questions: list[str], answers: list[str], responses: list[str], *,
                  max_new_tokens: int = 256, batch_size: int = 16,
                  max_response_chars: int = 16000) -> tuple[torch.Tensor, dict]:
    """r_ans from a text-only LLM judge (any causal LM + its tokenizer), greedy, batched through transformers'
    `generate`. Returns (scores [N] in {0., 1.}, stats). An unparsable verdict scores 0 and is counted in
    stats["n_unparsable"]; a response longer than `max_response_chars` is cut from the left (its end holds
    the answer) and counted in stats["n_truncated"]."""
    n_cut = sum(len(r) > max_response_chars for r in responses)
    responses = [r[-max_response_chars:] for r in responses]
    chats = [[{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": judge_prompt(q, a, r)}]
             for q, a, r in zip(questions, answers, responses)]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                              pad_token_id=pad)                                 # not the judge's own settings
    device = next(model.parameters(), torch.zeros(0)).device  # (CPU for a model without weights)
    verdicts = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, padding_side="left",  # every row ends together
                        add_special_tokens=False, return_tensors="pt").to(device)
        out = model.generate(**enc, generation_config=greedy)                   # [b, P + new tokens]
        verdicts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    parsed = [parse_judge_score(v) for v in verdicts]
    scores = torch.tensor([p if p is not None else 0.0 for p in parsed])  # [N]
    n_bad = sum(p is None for p in parsed)
    if n_bad or n_cut:
        log.warning("judge: %d/%d verdicts unparsable (scored 0), %d responses truncated",
                    n_bad, len(parsed), n_cut)
    stats = {"n": len(parsed), "n_unparsable": n_bad, "n_truncated": n_cut,
             "mean": scores.mean().item() if len(parsed) else 0.0}
    return scores, stats


# -----------------------------------------------------------------------------
# The similarity reward and the total

def similarity_reward(p_student: torch.Tensor, mode: str = "binary") -> torch.Tensor:
    """r_sim from D's p(student) [N]: "binary" 1[p < 0.5] (the paper), "continuous" 1 - p (its ablation)."""
    if mode == "binary":
        return (p_student < 0.5).float()  # [N]
    if mode == "continuous":
        return 1.0 - p_student.float()  # [N]
    raise ValueError(f"similarity reward mode must be 'binary' or 'continuous', got {mode!r}")


def combine_rewards(r_sim: torch.Tensor | None, r_ans: torch.Tensor | None,
                    w_sim: float = 1.0, w_ans: float = 1.0) -> tuple[torch.Tensor, dict]:
    """R = w_sim * r_sim + w_ans * r_ans (the paper: weights 1 and 1). A component that is None is off
    (e.g. RL only: r_sim=None; similarity only: r_ans=None). Returns (R [N], {"r_sim": ..., "r_ans": ...})."""
    parts = {"r_sim": r_sim, "r_ans": r_ans}
    weights = {"r_sim": w_sim, "r_ans": w_ans}
    on = [k for k, v in parts.items() if v is not None]
    if not on:
        raise ValueError("combine_rewards: both reward components are off")
    R = sum(weights[k] * parts[k].float() for k in on)  # [N]
    return R, parts

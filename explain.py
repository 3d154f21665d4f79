"""One RIL step, shown with real numbers (Algorithm 2 on one question).

    python explain.py               # the embedded run's SFT student and discriminator -> docs/one-step.md
    python explain.py --student CKPT --data rl.jsonl --discriminator D --out one-step.md

Runs ril.py's own functions, in order, on one question of the RL split, in one process: the G student
samples and the G cached teacher responses (step 2), the discriminator's update on them (step 3, Eq. 1),
D(o), r_sim, r_ans, R and the advantage A of every response (step 4), and the policy update (step 5, Eq. 2),
with each response's share of the loss before the update and the ratio pi_new / pi_old it left behind. It
prints the table and writes it as markdown. Any ril.py flag applies (`--group-size`, `--beta`, `--seed`).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

import discriminator
import distributed
import ril
import rollout
from data.build import DEFAULT_WORLD, split_paths, tiny_disc_dir, world_dirs
from data.dataset import load_jsonl, teacher_names

OUT = Path(__file__).parent / "docs" / "one-step.md"


def shorten(text: str, width: int = 90) -> str:
    """One line of at most `width` characters: the start and the end (where the answer is)."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width // 2 - 2] + " ... " + text[-(width // 2 - 3):]


def response_terms(cfg, m, prompts, ids, mask, adv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per response: its log-probs under the policy [N, T], and its share of Eq. 2's loss and of the KL term
    (token-mean aggregation over the whole group: the shares add up to the loss)."""
    with torch.no_grad():
        logp = rollout.response_logprobs(m.policy, prompts, ids, mask, cfg.temperature or 1.0)   # [N, T]
        ref = logp
        if cfg.beta:
            ref = rollout.response_logprobs(m.ref, prompts, ids, mask, cfg.temperature or 1.0)
    log_r = torch.where(mask, ref - logp, 0.0)
    k3 = torch.exp(log_r) - log_r - 1                                                # [N, T]
    per_token = -adv[:, None] + cfg.beta * k3                                 # ratio = 1 before the update
    n = mask.sum()
    return logp, (per_token * mask).sum(1) / n, (cfg.beta * k3 * mask).sum(1) / n   # [N, T], [N], [N]


def explain(cfg: ril.Config, student: str, disc: str, device) -> tuple[dict, list[dict]]:
    """One step of Algorithm 2 on one question; (the question, one row per response with every number)."""
    cfg = dataclasses.replace(cfg, batch_size=1)
    rows = load_jsonl(cfg.data)
    names = teacher_names(rows, cfg.teachers, cfg.data)
    m = ril.load_models(cfg, student, disc, None, device)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    batch = [rows[cfg.seed % len(rows)]]
    # 1-2. pi_old <- pi_theta; G student samples + G cached teacher responses
    prompts, ids, mask, k, _ = ril.sample_group(cfg, 0, batch, m, names, gen)
    texts = [m.tok.decode(row[keep].tolist(), skip_special_tokens=True) for row, keep in zip(ids, mask)]
    is_student = ril.student_rows(len(texts), k, cfg.group_size)
    # 3. the discriminator's update on this group (Eq. 1)
    student_texts = [t for t, s in zip(texts, is_student) if s]
    teacher_texts = [t for t, s in zip(texts, is_student) if not s]
    d_stats = discriminator.update(m.disc, m.dopt, m.tok, student_texts, teacher_texts, cfg.max_disc_len)
    # 4. rewards and advantages
    reward, parts = ril.score_group(cfg, batch, texts, k, m, {})
    adv = ril.group_advantages(reward.float(), k)
    logp, share, kl = response_terms(cfg, m, prompts, ids, mask, adv)
    # 5. the policy update (Eq. 2), then the ratio it leaves behind
    p_stats = ril.policy_update(cfg, m, prompts, ids, mask, adv, k)
    with torch.no_grad():
        new = rollout.response_logprobs(m.policy, prompts, ids, mask, cfg.temperature or 1.0)
    ratio = (torch.exp(new - logp) * mask).sum(1) / mask.sum(1)                      # [N] mean over tokens
    out = []
    for i, text in enumerate(texts):
        out.append({"who": "student" if is_student[i] else "teacher", "text": text,
                    "D": parts["p_student"][i].item(), "r_sim": parts["r_sim"][i].item(),
                    "r_ans": parts["r_ans"][i].item(), "R": reward[i].item(), "A": adv[i].item(),
                    "loss_share": share[i].item(), "kl_share": kl[i].item(), "ratio": ratio[i].item(),
                    "outside_clip": abs(ratio[i].item() - 1) > cfg.clip_eps})
    question = {"question": batch[0]["question"], "answer": batch[0]["answer"], "disc": d_stats,
                "policy": p_stats, "G": cfg.group_size, "beta": cfg.beta, "eps": cfg.clip_eps}
    return question, out


def markdown(q: dict, rows: list[dict], command: str) -> str:
    """The step as a markdown page: the question, a table of the 2G responses, what happened in each step."""
    lines = ["# One RIL step, with real numbers", "",
             f"Made by `{command}` (ril.py's functions, one process). Question: **{q['question']}** "
             f"(answer: {q['answer']}). G = {q['G']} student samples and G cached teacher responses form "
             "the group.",
             "", "| # | who | response (shortened) | D(o) | r_sim | r_ans | R | A | loss share | KL share | "
             "ratio after |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        clip = " (outside 1 ± eps)" if r["outside_clip"] else ""
        lines.append(f"| {i} | {r['who']} | {shorten(r['text']).replace('|', '/')} | {r['D']:.3f} | "
                     f"{r['r_sim']:.0f} | {r['r_ans']:.0f} | {r['R']:.0f} | {r['A']:+.3f} | "
                     f"{r['loss_share']:+.4f} | {r['kl_share']:.5f} | {r['ratio']:.3f}{clip} |")
    d, p = q["disc"], q["policy"]
    lines += ["", "How to read it:",
              f"- **Step 3 (Eq. 1).** Before its update on this group, D gave the student's responses a "
              f"mean p(student) of {d['p_student']:.3f} and the teachers' {d['p_teacher']:.3f} "
              f"(loss {d['loss']:.3f}, accuracy {d['accuracy']:.3f}); the column D(o) is after the update.",
              "- **Step 4.** r_sim = 1[D(o) < 0.5], r_ans = the rule-based answer check, R = r_sim + r_ans, "
              "A = R - mean(R) over the 2G responses (Dr.GRPO: no division by the std). The A column sums "
              "to 0.",
              f"- **Step 5 (Eq. 2).** With mu = 1 the ratio pi_theta / pi_old is exactly 1 when the loss is "
              f"taken, so a response's share of the loss is -A times its share of the group's tokens plus "
              f"beta = {q['beta']} times its KL term (k3 against pi_ref); the shares add up to the loss "
              f"({p['policy/loss']:+.4f}). Responses with A > 0 are pushed up, those with A < 0 down, "
              f"teacher responses included. 'ratio after' is the mean of pi_new / pi_old over the "
              f"response's tokens after the update; with mu > 1 a ratio outside 1 ± eps (eps = {q['eps']}) "
              f"would be clipped at the next step. Gradient norm {p['policy/grad_norm']:.3f}, entropy of "
              f"the student's tokens {p['policy/entropy']:.3f}.", ""]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(argv.pop(argv.index("--out") + 1)) if "--out" in argv else OUT
    argv = [a for a in argv if a != "--out"]
    cfg = ril.parse_config(argv)
    settings = (cfg.algo, cfg.similarity, cfg.answer_reward, cfg.loss_agg)
    if settings != ("ril", "binary", "rule", "token-mean"):
        raise SystemExit("explain.py shows RIL as the paper runs it: --algo ril, binary similarity, rule "
                         "answers, token-mean aggregation")
    _, world, device = distributed.setup()
    if world > 1:
        raise SystemExit("explain.py runs one process: python explain.py")
    data_dir, tiny = world_dirs(cfg.world)  # the embedded world's data and checkpoints (--world)
    if not cfg.student:
        cfg = dataclasses.replace(cfg, **split_paths(dataclasses.asdict(cfg), data_dir))
    student = cfg.student or str(tiny / "tiny-sft")
    disc = cfg.discriminator or str(tiny_disc_dir(tiny, cfg.teachers))  # as ril.py names it
    flags = (f" --world {cfg.world}" if cfg.world != DEFAULT_WORLD else "") + \
        (f" --teachers {cfg.teachers}" if cfg.teachers else "")
    for path, stage in ((student, "sft"), (disc, "disc")):
        if not (Path(path) / "config.json").exists():
            raise SystemExit(f"{path} is missing: run `torchrun --nproc_per_node=2 ril.py --stage {stage}"
                             f"{flags}` first")
    torch.manual_seed(cfg.seed)
    q, rows = explain(cfg, student, disc, device)
    command = " ".join(["python explain.py", *(argv or [])])
    text = markdown(q, rows, command)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()

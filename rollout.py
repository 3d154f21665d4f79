"""Rollout (not written yet): prompt encoding, hand-written KV-cache batched sampling, response log-probs."""

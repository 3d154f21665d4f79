"""Rewards (not written yet): answer extraction and checking, the LLM-judge reward, the similarity reward."""

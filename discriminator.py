"""The LLM discriminator (not written yet): built from the student, its prompt, Eq. 1 loss, pre-training and update."""

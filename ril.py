"""RIL: the entry point (not written yet).

Will hold the config, distributed set-up (FSDP2), the Dr.GRPO / GRPO losses (Eq. 2), and the SFT,
discriminator pre-training and RL stages of Algorithm 2, with checkpoints and main().
"""

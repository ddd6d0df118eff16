"""Evaluation on held-out prompts: during and at the end of a stage, and of a finished run
(`python -m rlhf.evaluation RUN_DIR`)."""

"""`python -m rlhf.bench`: throughput of the PPO loop and reward-model training, optionally vs TRL.

See rlhf/bench/__main__.py for the command and its output, rlhf/bench/common.py for the FLOP count.
"""

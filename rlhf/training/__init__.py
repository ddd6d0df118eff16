"""The training pipeline: plan the stages an algorithm needs, check everything before any model is
built, run each stage (`rlhf.stages`) with Lightning; reward sources and memory helpers it uses."""

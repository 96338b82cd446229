"""Training: the `train:` config, the data pipeline of a run, optimizer, losses, the train step,
the loop, DPO, GRPO (objective, prompt data, rewards), metrics and the run-directory lock."""

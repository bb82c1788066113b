"""RLHF: PPO (ours, ``ppo``) against a reward model job, or GRPO / RLOO through TRL (``grpo``).

``prompts`` loads the prompts file, ``roles`` puts the policy, value, reference and reward
roles on one shared base model, ``rewards`` holds the built-in reward functions, and
``train.train_rlhf`` picks the algorithm.
"""

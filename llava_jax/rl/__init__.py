"""Reinforcement learning from the reward model: PPO's math and update (`ppo`), the roles over
shared bases (`roles`), rollouts (`rollout`), the Fact-RLHF score (`fact_reward`), the PPO
layout (`setup`) and loop (`loop`)."""

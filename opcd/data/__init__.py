"""Data and contexts: dataset rows, prompts, teacher contexts, experience, seeds and batching (pure)."""

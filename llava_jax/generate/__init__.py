"""Generation: the KV-cache sampler (`sampling`) and batched answers to an eval file (`answer`)."""

"""Rollouts: dual-view prompts and the vLLM engines (Ray actors) that sample them; the weight sync into those
engines is harmony_mcore.sync."""

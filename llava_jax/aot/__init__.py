"""Ahead-of-time compilation without the hardware: every step of a stage compiled for a target
(`compile_check`), its memory report (`report`) and the TPU / GPU targets (`targets`)."""

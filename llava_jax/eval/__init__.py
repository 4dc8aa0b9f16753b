"""Evaluation: POPE scores (`pope`), the toy world's pixel judge (`toy_judge`) and its held-out
before/after table (`toy_eval`)."""

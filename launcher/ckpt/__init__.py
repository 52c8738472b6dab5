"""After a run: checkpoints filtered and merged, LoRA folded into the base, and a generation check."""

"""Pretrained weights in and out: `launcher model import` (GGUF or a Hugging Face directory to a
MindFormers checkpoint) and `launcher ckpt export` (a run's checkpoint to a Hugging Face directory)."""

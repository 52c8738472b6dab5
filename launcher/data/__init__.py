"""Training data: the job's data: section tokenized into MindRecord parts, cached by content."""

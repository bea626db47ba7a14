"""What users hold: the PTQ and QAT modules, their configs, the freeze schedule and checkpoints."""

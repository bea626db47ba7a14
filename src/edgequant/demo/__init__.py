"""The digits task: bundled data, float training with its checkpoint cache, and the demo job.
The library floors below never import it."""

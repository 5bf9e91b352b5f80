"""The evaluation framework of the paper (DESIGN.md §5): prompts, generation, encoders, metrics, report."""

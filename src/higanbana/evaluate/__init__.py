"""The evaluation framework of the paper (docs/design.md §5): prompts, generation, encoders, metrics, report."""

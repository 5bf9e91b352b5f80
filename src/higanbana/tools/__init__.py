"""Tools on adapter files: merge, extract (SVD), resize, convert."""

"""Jobs that combine training and evaluation: ``experiment`` (a grid of configurations × seeds ×
checkpoints, trained and evaluated together) and ``selfcheck`` (every algorithm trained, saved and
reloaded on a tiny UNet). The miniature world's demo is :mod:`higanbana.miniworld.demo`."""

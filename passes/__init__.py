"""Graph passes, in pipeline order: trace, shape_prop, annotate, coarsen, partition, split."""

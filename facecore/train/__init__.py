"""Training: the loop, the margin classifier, run directories and logs."""

"""Training-free conversion of a dense checkpoint: the block-by-block pipeline, compensation, sensitivity and plans."""

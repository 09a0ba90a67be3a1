"""Training side of metanet: the model zoo builder, the LightningDataModule over the zoo
and the LightningModule of the metanetwork (see DESIGN.md, "Data flow").

The zoo (`metanet zoo build`):
    specs         what to train as plain data: families, LMShape, TrainSettings
    tokenizer     the shared byte-level BPE
    lm            transformers causal LMs from random init, the AdamW loop, losses
    zoo_config    ZooConfig → training runs → members, and their train/val/test split
    zoo_data      the zoo's tokenizer and token windows, made once per zoo
    member_cache  per member: calibration FFN inputs, neuron statistics, teacher partitions
    zoo_run       one run trained, its members written as complete folders only
    zoo           build_zoo: resumable, parallel, manifest, progress, MLflow
"""

"""Training side of metanet: the model zoo builder, the LightningDataModule over the zoo
and the LightningModule of the metanetwork (see DESIGN.md, "Data flow")."""

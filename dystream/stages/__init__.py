"""One LightningModule per training stage: models + objectives + optimizers + freezing."""

"""Lightning pieces: the QAT LightningModule, the text DataModule and `train(cfg)`."""

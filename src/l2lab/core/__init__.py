"""The science: the penalty, the LightningModule, stacked layers, data, the reference loop."""

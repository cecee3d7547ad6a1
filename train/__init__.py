"""The large-batch ImageNet training app: `python -m train.main --help`."""

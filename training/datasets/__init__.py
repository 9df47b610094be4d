"""Image-caption datasets that can be built offline (``python -m training.datasets.<name> --help``)."""

"""Training, evaluation and publishing of ADAPT models (``python -m training.<tool> --help``).

``training`` builds on the ``adapt`` library; ``adapt`` never imports it.
"""

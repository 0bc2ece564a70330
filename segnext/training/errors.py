"""The one error of a training run that the command line reports."""


class TrainError(Exception):
    """A problem with the command line, the data or a checkpoint: reported in one line."""

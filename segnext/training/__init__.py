"""The parts of ``segnext.train``, one job per module (the command line is ``segnext/train.py``):

- ``runtime``: the processes: ``Runtime``, ``init_runtime``, gathering, means over the ranks,
  BatchNorm statistics averaged, the logger.
- ``recipe``: the official recipe: the model as trained (pretrained weights, SyncBatchNorm,
  gradient checkpointing, DDP), AdamW over the parameter groups, ``warmup_poly``,
  ``segmentation_loss``.
- ``loaders``: the datasets and their loaders, a function of (seed, step):
  ``StepBatchSampler``, ``SeededSamples``.
- ``state``: training checkpoints: saving, the ``--resume`` path, reading and checking one,
  restoring the optimizer, scheduler, GradScaler and RNG streams.
- ``evaluation``: the mIoU evaluation.
- ``finite``: the non-finite checks of the loss and the weights.
- ``loop``: ``TrainingRun`` (set-up, step, log line, evaluation, checkpoints) and
  ``TrainResult``.
- ``errors``: ``TrainError``, which the command line reports in one line.
"""
